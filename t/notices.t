#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Official notices: every change through the status admin endpoint gets a
# notice code in its answer; <status>notices/CODE answers the notice with
# a compact JWS that verifies with nothing but the JWK Set (openssl,
# python3-cryptography) and whose signature's first 50 bits are the code;
# codes are read as people type them (case, hyphens, Crockford's O/I/L);
# a forged or unknown code is a 404 problem+json; the notice and the
# change are one script call (also when another change took the ID the
# gateway signed for); retention; lookups rate-limited per address (429,
# Retry-After); notices survive a reload; without a signing key none.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);
use Civicgate::Status qw(:all);
use Civicgate::Sign qw(:all);

my $t = Civicgate::Test->new;

$t->write_secret_file('keys', [ [ k1 => random_key_hex(32) ] ]);
my $KEY = ed25519_key($t, 'signing.pem');
my $CODE_RE = qr/^[0-9A-HJKMNP-TV-Z]{5}-[0-9A-HJKMNP-TV-Z]{5}$/;

$t->write_nginx_conf(<<"EOF");
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;
    civicgate_signing_key $KEY kid=n1;
    civicgate_status_history 10;
    civicgate_notice_limit 120r/m burst=30;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        location /tax/ {
            civicgate_service tax;
            return 200 "tax\\n";
        }
        location /permits/ {
            civicgate_service permits;
            return 200 "permits\\n";
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
EOF

$t->run_redis;
$t->run;

my $SET = json_of($t->request('/.well-known/jwks.json'));
my ($JWK) = @{ $SET->{keys} };

sub lookup {
    my ($code) = @_;
    my $r = $t->request("/status/notices/$code");
    return ($r, json_of($r));
}

sub change {
    my ($method, $name, $body) = @_;
    my $r = admin_service($t, $method, $name, $body);
    is($r->status, 200, "$method $name: 200") or diag $r->raw;
    return json_of($r);
}

sub not_official {
    my ($code, $name) = @_;
    my ($r, $p) = lookup($code);
    is($r->status, 404, "$name: 404");
    like($r->header('Content-Type') // '', qr{^application/problem\+json},
        "$name: problem+json");
    is($p->{type}, 'urn:civicgate:problem:not-an-official-notice',
        "$name: not an official notice");
}

# what a relay or a citizen's phone can check with the JWK Set alone
sub check_notice {
    my ($n, $want, $name) = @_;
    is_deeply([ sort keys %$n ],
        [ qw(code jws message service sid state time) ],
        "$name: code, service, state, message, time, sid, jws");
    my ($h, $payload, $input, $sig) = jws_parse($n->{jws});
    is_deeply($h, { alg => 'EdDSA', cty => 'json', kid => 'n1' },
        "$name: JWS header alg EdDSA, cty json, kid");
    my %body = %$n;
    delete @body{qw(code jws)};
    is($payload, canonical(\%body),
        "$name: JWS payload is the notice's sorted, compact JSON");
    is(openssl_verify($t, jwk_pem($JWK->{x}), $input, $sig), 1,
        "$name: JWS verifies with the JWK (openssl)");
    is(python_verify($t, $JWK->{x}, $input, $sig), 1,
        "$name: JWS verifies with the JWK (python)");
    is($n->{code}, notice_code_of($sig),
        "$name: the code is the signature's first 50 bits");
    for my $k (sort keys %$want) {
        is_deeply($n->{$k}, $want->{$k}, "$name: $k");
    }
}

###########################################################################
# a change, its code, the notice

my $msg = { id => 'Layanan pajak terganggu', en => 'Tax service degraded' };
my $a1 = change('PUT', 'tax', { state => 'degraded', message => $msg });
like($a1->{notice} // '', $CODE_RE, 'admin answer: a notice code XXXXX-XXXXX');
my $CODE = $a1->{notice};

my ($r, $n) = lookup($CODE);
is($r->status, 200, 'lookup: 200') or diag $r->raw;
like($r->header('Content-Type') // '', qr{^application/json}, 'application/json');
check_notice($n, { code => $CODE, service => 'tax', state => 'degraded',
    message => $msg, sid => $a1->{id}, time => $a1->{updated_at} }, 'notice');
like($n->{time}, qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/, 'time RFC 3339');

is($t->redis_query('HGET', 'cg:{status}:notices', $CODE), substr($r->body, 0, -1),
    'stored in cg:{status}:notices as answered');
is_deeply($t->redis_query('LRANGE', 'cg:{status}:notice-codes', 0, -1), [ $CODE ],
    'its code in cg:{status}:notice-codes');

# as people type it
{
    my $plain = $CODE =~ s/-//r;
    my @forms = (lc $CODE, $plain, lc($plain), substr($plain, 0, 3) . '-'
        . substr($plain, 3, 4) . '-' . substr($plain, 7));
    (my $confusable = $CODE) =~ tr/01/OL/;
    push @forms, $confusable if $confusable ne $CODE;
    (my $confusable2 = lc $CODE) =~ tr/01/oi/;
    push @forms, $confusable2 if $confusable2 ne lc $CODE;
    for my $f (@forms) {
        my ($r2, $n2) = lookup($f);
        is($r2->status, 200, "typed as \"$f\": 200");
        is($n2->{code}, $CODE, "typed as \"$f\": the same notice");
    }
}

# forged
{
    my @sym = split //, '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
    my $one = $CODE;
    my $i = index(join('', @sym), substr($one, 3, 1));
    substr($one, 3, 1) = $sym[($i + 1) % 32];
    not_official($one, 'one symbol changed');
    not_official(join('', map { $sym[int rand 32] } 1 .. 5) . '-'
        . join('', map { $sym[int rand 32] } 1 .. 5), 'random code');
    not_official('UUUUU-UUUUU', 'U is not a symbol');
    not_official(substr($CODE, 0, 10), 'too short');
    not_official($CODE . '0', 'too long');
    not_official('x' x 200, 'much too long');
    not_official('7KQ2M%2DXT0YB', 'an escaped hyphen, not a notice');
}

# clearing a service is a change with a notice too
{
    my $a2 = change('DELETE', 'tax');
    like($a2->{notice} // '', $CODE_RE, 'DELETE: a notice code');
    my ($r2, $n2) = lookup($a2->{notice});
    is($r2->status, 200, 'DELETE notice: 200');
    check_notice($n2, { service => 'tax', state => 'operational',
        message => undef, sid => $a2->{id} }, 'DELETE notice');
}

###########################################################################
# another change took the ID the gateway signed for: signed again after it

{
    my $ms = int(time * 1000) + 3_600_000;
    $t->redis_query('XADD', 'cg:{status}:history', "$ms-5", 'service',
        'permits', 'record', '');
    my $a3 = change('PUT', 'permits', { state => 'outage' });
    is($a3->{id}, "$ms-6", 'the change follows the newer entry');
    my ($r3, $n3) = lookup($a3->{notice});
    is($r3->status, 200, 'its notice: 200');
    check_notice($n3, { sid => "$ms-6", state => 'outage',
        time => $a3->{updated_at} }, 'notice signed again');
    ok(wait_state('permits', 'outage'), 'the status shows the change');
}

sub wait_state {
    my ($name, $state) = @_;
    return $t->wait_until(sub {
        (state_of(json_of($t->request('/status/')), $name) // '') eq $state
    }, timeout => 5);
}

###########################################################################
# a reload keeps them: same key, same JWK Set

{
    ok($t->reload, 'reload');
    my ($r4, $n4) = lookup($CODE);
    is($r4->status, 200, 'after reload: the first notice still answers');
    check_notice($n4, { code => $CODE }, 'after reload');
}

###########################################################################
# retention: the newest civicgate_status_history notices (10)

my @codes;
{
    for my $i (1 .. 10) {
        push @codes, change('PUT', 'permits',
            { state => $i % 2 ? 'degraded' : 'operational' })->{notice};
    }
    is($t->redis_query('HLEN', 'cg:{status}:notices'), 10, '10 notices kept');
    is($t->redis_query('LLEN', 'cg:{status}:notice-codes'), 10,
        '10 codes listed');
    not_official($CODE, 'the oldest notice, past retention');
    is(($t->request("/status/notices/$codes[-1]"))->status, 200,
        'the newest still answers');
}

###########################################################################
# rate limit: 120/min, 30 at once, per address

{
    my @raw = map { "GET /status/notices/AAAAA-AAAAA HTTP/1.1\r\n"
        . "Host: localhost\r\nConnection: close\r\n\r\n" } 1 .. 45;
    my @res = map { parse_response($_ // '') }
        http_burst(\@raw, port => $t->port(0));
    my @limited = grep { $_->status == 429 } @res;
    my @passed = grep { $_->status == 404 } @res;
    ok(@limited >= 10, 'a burst of 45: some refused with 429')
        or diag join ' ', map { $_->status } @res;
    ok(@passed >= 1 && @passed <= 34, 'no more than the burst passes')
        or diag scalar @passed;
    my $l = $limited[0];
    like($l->header('Retry-After') // '', qr/^[1-9]\d*$/,
        '429: Retry-After in whole seconds');
    like($l->header('Content-Type') // '', qr{^application/problem\+json},
        '429: problem+json');
    is(json_of($l)->{type}, 'urn:civicgate:problem:notice-lookups-limited',
        '429: type');
    sleep(1.1);
    is($t->request("/status/notices/$codes[-1]")->status, 200,
        'a second later: admitted again');
}

###########################################################################
# without a signing key: no notices

{
    my $b = $t->nginx('b');
    $b->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TOPDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;
    civicgate_status_history 10;

    server {
        listen 127.0.0.1:%%PORT_b%%;
        server_name localhost;
        location /permits/ {
            civicgate_service permits;
            return 200 "permits\n";
        }
        location /status/ {
            civicgate_status;
        }
        location /civicgate/admin/ {
            civicgate_admin;
        }
    }
EOF
    $b->run;
    my $before = $t->redis_query('LRANGE', 'cg:{status}:notice-codes', 0, -1);
    my $rb = admin_service($b, 'PUT', 'permits', { state => 'maintenance' },
        port => $t->port('b'));
    is($rb->status, 200, 'no key: the change is made');
    my $ab = json_of($rb);
    ok(exists $ab->{notice} && !defined $ab->{notice}, 'no key: "notice": null');
    is_deeply($t->redis_query('LRANGE', 'cg:{status}:notice-codes', 0, -1),
        $before, 'no key: no notice stored');
    my $rl = $b->request("/status/notices/$before->[0]", port => $t->port('b'));
    is($rl->status, 200,
        'no key: notices signed earlier by another gateway still answer');
}

$t->done_testing;
