#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Consent receipts with a signing key: "alg" EdDSA, "key_id" the kid,
# "signature" base64url of the Ed25519 signature of the receipt's sorted,
# compact JSON without "signature".  Verified here as a stranger would,
# with nothing but the JWK Set: by openssl pkeyutl -verify -rawin and by
# python3-cryptography; a changed field fails both.  receipts/verify
# accepts EdDSA receipts and HS256 receipts of the secret file's keys.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP ();
use Civicgate::Test qw(:all);
use Civicgate::Sign qw(:all);

my $t = Civicgate::Test->new;
my $JSON = JSON::PP->new->utf8;

my $HMAC = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $HMAC ] ]);
my $KEY = ed25519_key($t, 'signing.pem');

$t->write_nginx_conf(<<"EOF");
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;
    civicgate_signing_key $KEY kid=r1;

    civicgate_consent_purposes {
        tax    "Perpajakan"        "Taxation";
        health "Layanan kesehatan" "Health services";
    }

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;
        civicgate_citizen \$http_x_citizen_id;
        civicgate_channel \$http_x_channel;

        location /consents/ {
            civicgate_journey on secure=off;
            civicgate_consent_api;
        }
        location = /.well-known/jwks.json {
            civicgate_jwks;
        }
    }
EOF

$t->run_redis;
$t->run;

my $set = $JSON->decode($t->request('/.well-known/jwks.json')->body);
my ($jwk) = grep { $_->{kid} eq 'r1' } @{ $set->{keys} };
ok($jwk, 'the JWK Set has kid r1') or BAIL_OUT('no key');

sub api {
    my ($method, $path, $citizen, $body) = @_;
    my @h = ('X-Channel' => 'web');
    push @h, 'X-Citizen-Id' => $citizen if defined $citizen;
    push @h, 'Content-Type' => 'application/json' if defined $body;
    my $r = $t->request($path, method => $method, headers => \@h,
        (defined $body ? (body => $body) : ()));
    return ($r, eval { $JSON->decode($r->body) });
}

sub verify {
    my ($receipt) = @_;
    my (undef, $d) = api('POST', '/consents/receipts/verify', undef,
        $JSON->encode($receipt));
    return ($d && $d->{valid}) ? 1 : 0;
}

sub offline {
    my ($receipt) = @_;
    my %body = %$receipt;
    my $sig = b64url_decode(delete $body{signature});
    my $msg = canonical(\%body);
    return (openssl_verify($t, jwk_pem($jwk->{x}), $msg, $sig),
        python_verify($t, $jwk->{x}, $msg, $sig));
}

my ($r, $grant) = api('PUT', '/consents/tax', 'CIT-EDDSA-1',
    '{"expires_at":"2030-01-01T00:00:00Z","notes":"at the counter"}');
is($r->status, 201, 'grant: 201') or diag $r->raw;
is($grant->{alg}, 'EdDSA', 'grant: alg EdDSA');
is($grant->{key_id}, 'r1', 'grant: key_id is the kid');
like($grant->{signature} // '', qr/^[A-Za-z0-9_-]{86}$/,
    'grant: signature is 64 bytes, base64url without padding');
is(length b64url_decode($grant->{signature}), 64, 'grant: 64-byte signature');
is_deeply([ offline($grant) ], [ 1, 1 ],
    'grant: verifies with the JWK alone (openssl, python)');
ok(verify($grant), 'grant: receipts/verify says valid');

my ($r2, $withdrawal) = api('DELETE', '/consents/tax', 'CIT-EDDSA-1');
is($r2->status, 200, 'withdrawal: 200') or diag $r2->raw;
is($withdrawal->{type}, 'withdrawal', 'withdrawal receipt');
is_deeply([ offline($withdrawal) ], [ 1, 1 ],
    'withdrawal: verifies offline (openssl, python)');
ok(verify($withdrawal), 'withdrawal: receipts/verify says valid');

# any change breaks it, everywhere
for my $field (qw(purpose citizen granted_at channel)) {
    my %bad = %$grant;
    $bad{$field} = $field eq 'purpose' ? 'health' : 'x' . ($bad{$field} // '');
    is_deeply([ offline(\%bad) ], [ 0, 0 ], "changed $field: fails offline");
    ok(!verify(\%bad), "changed $field: receipts/verify says invalid");
}

{
    my %bad = %$grant;
    my $s = b64url_decode($bad{signature});
    substr($s, 10, 1) = chr(ord(substr($s, 10, 1)) ^ 1);
    my $b = MIME::Base64::encode_base64($s, '');
    $b =~ tr{+/}{-_};
    $b =~ s/=+$//;
    $bad{signature} = $b;
    ok(!verify(\%bad), 'one bit of the signature flipped: invalid');

    %bad = (%$grant, key_id => 'nope');
    ok(!verify(\%bad), 'unknown kid: invalid');

    %bad = (%$grant, signature => 'abc');
    ok(!verify(\%bad), 'short signature: invalid');

    %bad = (%$grant, alg => 'HS256');
    ok(!verify(\%bad), 'EdDSA signature presented as HS256: invalid');
}

# an HS256 receipt of the secret file's key is still accepted
{
    my %hs = %$grant;
    delete $hs{signature};
    $hs{alg} = 'HS256';
    $hs{key_id} = 'k1';
    $hs{signature} = receipt_signature($HMAC, \%hs);
    ok(verify(\%hs), 'HS256 receipt of the secret file: valid');
    $hs{purpose} = 'health';
    ok(!verify(\%hs), 'HS256 receipt changed: invalid');
}

$t->done_testing;
