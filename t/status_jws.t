#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The status document as a compact JWS (RFC 7515) on ?format=jws or
# Accept: application/jose: header alg EdDSA, cty json, kid; payload the
# exact bytes of the JSON document (each language); verified with the JWK
# Set alone (openssl, python3-cryptography); its own strong ETag and 304,
# Vary: Accept; application/jose+json stays JSON; a change changes it;
# without a signing key, 406 problem+json.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);
use Civicgate::Status qw(:all);
use Civicgate::Sign qw(:all);

my $t = Civicgate::Test->new;

$t->write_secret_file('keys', [ [ k1 => random_key_hex(32) ] ]);
my $KEY = ed25519_key($t, 'signing.pem');

$t->write_nginx_conf(<<"EOF");
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;
    civicgate_signing_key $KEY kid=s1;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        location /tax/ {
            civicgate_service tax;
            return 200 "tax\\n";
        }
        location /status/ {
            civicgate_status;
        }
        location /civicgate/admin/ {
            civicgate_admin;
        }
        location = /.well-known/jwks.json {
            civicgate_jwks;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_1%%;
        server_name localhost;
        location /status/ {
            civicgate_status;
        }
    }
EOF

$t->run_redis;
$t->run;

my ($JWK) = @{ json_of($t->request('/.well-known/jwks.json'))->{keys} };

sub check_jws {
    my ($r, $json, $name) = @_;
    is($r->status, 200, "$name: 200") or diag $r->raw;
    is($r->header('Content-Type'), 'application/jose',
        "$name: Content-Type application/jose");
    like($r->body, qr/^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{86}$/,
        "$name: compact serialization");
    my ($h, $payload, $input, $sig) = jws_parse($r->body);
    is_deeply($h, { alg => 'EdDSA', cty => 'json', kid => 's1' },
        "$name: header alg EdDSA, cty json, kid");
    is($payload, $json->body, "$name: payload is the JSON document, byte for byte");
    is(openssl_verify($t, jwk_pem($JWK->{x}), $input, $sig), 1,
        "$name: verifies (openssl)");
    is(python_verify($t, $JWK->{x}, $input, $sig), 1,
        "$name: verifies (python)");
    like($r->header('Vary') // '', qr/\bAccept\b(?!-)/, "$name: Vary: Accept");
    my $etag = $r->header('ETag') // '';
    (my $want = $json->header('ETag') // '') =~ s/"$/-jws"/;
    is($etag, $want, "$name: ETag is the JSON's with -jws");
    return $etag;
}

ok($t->wait_until(sub { fresh(json_of($t->request('/status/'))) }),
    'status loaded');

my $json = $t->request('/status/');
my $etag = check_jws($t->request('/status/?format=jws'), $json, '?format=jws');
check_jws($t->request('/status/', headers => [ Accept => 'application/jose' ]),
    $json, 'Accept: application/jose');
check_jws($t->request('/status/', headers =>
    [ Accept => 'text/html;q=0.9, application/jose' ]), $json,
    'Accept with application/jose among others');
check_jws($t->request('/status/?format=jws&lang=en'),
    $t->request('/status/?lang=en'), 'lang=en');
check_jws($t->request('/status/?format=jws&lang=all'),
    $t->request('/status/?lang=all'), 'lang=all');

{
    my $r = $t->request('/status/',
        headers => [ Accept => 'application/jose+json' ]);
    like($r->header('Content-Type') // '', qr{^application/json},
        'application/jose+json: JSON as before');

    $r = $t->request('/status/?format=jws',
        headers => [ 'If-None-Match' => $etag ]);
    is($r->status, 304, 'If-None-Match of the JWS: 304');
    is($r->body, '', '304: no body');

    $r = $t->request('/status/?format=jws',
        headers => [ 'If-None-Match' => $json->header('ETag') ]);
    is($r->status, 200, 'If-None-Match of the JSON: the JWS is sent');

    $r = $t->request('/status/?format=jws', method => 'HEAD');
    is($r->status, 200, 'HEAD: 200');
    is($r->body, '', 'HEAD: no body');
}

# a change: a new document, a new JWS
{
    my $a = admin_service($t, 'PUT', 'tax', { state => 'outage',
        message => { id => 'Pajak tidak tersedia', en => 'Tax unavailable' } });
    is($a->status, 200, 'change: 200');
    ok($t->wait_until(sub {
        (state_of(json_of($t->request('/status/')), 'tax') // '') eq 'outage'
    }), 'the change is in the document');
    my $j2 = $t->request('/status/');
    my $e2 = check_jws($t->request('/status/?format=jws'), $j2, 'after a change');
    isnt($e2, $etag, 'after a change: another ETag');
    my (undef, $payload) = jws_parse($t->request('/status/?format=jws')->body);
    is(state_of(json_of($payload), 'tax'), 'outage', 'the payload says outage');
}

# other servers of the same gateway sign too; no key: 406
{
    my $r = $t->request('/status/?format=jws', port => $t->port(1));
    is($r->status, 200, 'another server: signed too');

    my $b = $t->nginx('b');
    $b->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TOPDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;
    server {
        listen 127.0.0.1:%%PORT_b%%;
        server_name localhost;
        location /tax/ {
            civicgate_service tax;
            return 200 "tax\n";
        }
        location /status/ {
            civicgate_status;
        }
    }
EOF
    $b->run;
    $r = $b->request('/status/?format=jws', port => $t->port('b'));
    is($r->status, 406, 'no signing key: 406');
    like($r->header('Content-Type') // '', qr{^application/problem\+json},
        'no signing key: problem+json');
    is(json_of($r)->{type}, 'urn:civicgate:problem:not-signed',
        'no signing key: type not-signed');
    $r = $b->request('/status/', port => $t->port('b'));
    is($r->status, 200, 'no signing key: JSON as before');
}

$t->done_testing;
