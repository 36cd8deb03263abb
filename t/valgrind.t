#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The module under valgrind's memcheck, through every asynchronous path:
# journey events, a Redis rate limit, a consent check, the consent API (with
# EdDSA receipts, signed and verified), the
# health check and the maintenance switch against a real Redis; then
# clients that go away while their limit check, consent check, API call or
# health check waits on a stalled Redis, the command timing out after they
# left.  No invalid access, uninitialised use or leak of the module's own
# may show.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Select;
use IO::Socket::INET;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);
use Civicgate::Sign qw(ed25519_key);

my $VALGRIND = '/usr/bin/valgrind';
plan skip_all => 'valgrind not installed' unless -x $VALGRIND;
# valgrind cannot run a binary built with AddressSanitizer (make test-asan)
plan skip_all => 'nginx built with sanitizers' if $ENV{CIVICGATE_SANITIZER};

my $t = Civicgate::Test->new;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);
$t->write_file('ok.txt', "ok\n");
ed25519_key($t, 'signing.pem');
$t->run_redis;

my $STALL = $t->port('stall');

# a peer that accepts and reads but never answers
$t->run_stalled_peer($STALL);
ok($t->wait_port($STALL), 'stalled peer listening');

my $HTTP = <<'EOF';
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_signing_key %%TOPDIR%%/signing.pem;
    civicgate_redis redis://127.0.0.1:@REDIS@ timeout=@TIMEOUT@;
    civicgate_channel $http_x_channel;
    civicgate_citizen $http_x_citizen_id;
    civicgate_journey on;

    civicgate_limit_zone $civicgate_citizen zone=cit:1m rate=1r/m;
    civicgate_consent_purposes {
        health "Kesehatan" "Health";
    }
    civicgate_consent_cache zone=consent:1m ttl=1s;

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /limited {
            civicgate_limit zone=cit burst=5 nodelay;
            alias %%TESTDIR%%/ok.txt;
        }
        location /health {
            civicgate_consent health;
            alias %%TESTDIR%%/ok.txt;
        }
        location /consents/ {
            civicgate_consent_api;
        }
        location = /healthz {
            civicgate_journey off;
            civicgate_health interval=10ms;
        }
        location /admin/ {
            civicgate_admin;
        }
        location = /metrics {
            civicgate_journey off;
            civicgate_metrics;
        }
    }
EOF

sub start {
    my ($inst, $redis, $timeout) = @_;
    (my $http = $HTTP) =~ s/\@REDIS\@/$redis/;
    $http =~ s/\@TIMEOUT\@/$timeout/;
    $inst->write_nginx_conf($http, master_process => 'off');
    $inst->run(timeout => 60, wrapper => [ $VALGRIND, '--error-exitcode=0', '--leak-check=full',
        '--show-leak-kinds=definite', '--num-callers=30',
        '--log-file=' . $inst->testdir . '/valgrind.log' ]);
}

sub status {
    my ($resp) = @_;
    return ($resp // '') =~ m{^HTTP/1\.[01] (\d{3})} ? $1 : 0;
}

sub get {
    my ($inst, $path, %h) = @_;
    return status($inst->http_get($path, headers => \%h));
}

# --- 1. every path against a real Redis ------------------------------------

start($t, $t->redis_port, '2s');

my %who = ('X-Citizen-Id' => 'citizen-1', 'X-Channel' => 'web');
is(get($t, '/limited', %who), 200, 'limited request passes');
is(get($t, '/health', %who), 403, 'no consent: 403');

my $put = $t->http("PUT /consents/health HTTP/1.0\r\nHost: localhost\r\n"
    . "X-Citizen-Id: citizen-1\r\nContent-Length: 2\r\n\r\n{}");
is(status($put), 201, 'consent granted through the API');
{
    my ($receipt) = $put =~ /\r\n\r\n(.*)\z/s;
    my $v = $t->http("POST /consents/receipts/verify HTTP/1.0\r\n"
        . "Host: localhost\r\nContent-Length: " . length($receipt)
        . "\r\n\r\n$receipt");
    like($v // '', qr/"valid":true/, 'EdDSA receipt verified');
}
is(get($t, '/consents/', %who), 200, 'consents listed');
is(get($t, '/health', %who), 200, 'with consent: 200');

my $bad = $t->http("PUT /consents/health HTTP/1.0\r\nHost: localhost\r\n"
    . "X-Citizen-Id: citizen-1\r\nContent-Length: 3\r\n\r\n[1]");
is(status($bad), 400, 'bad body: 400');

my $passed = 0;
for (1 .. 10) {
    $passed++ if get($t, '/limited', 'X-Citizen-Id' => 'burst') == 200;
}
is($passed, 6, 'burst 5: six of ten pass');

ok($t->wait_until(sub {
    my $n = $t->redis_query('XLEN', 'cg:events');
    defined $n && !ref $n && $n >= 10;
}, timeout => 10), 'events reached Redis');

is(get($t, '/healthz'), 200, 'health: 200');
my @checks = http_burst([ map { "GET /healthz HTTP/1.0\r\nHost: l\r\n\r\n" }
    1 .. 5 ], port => $t->port(0), timeout => 30);
is(scalar(grep { status($_) == 200 } @checks), 5,
    'health: checks waiting on one PING');
is(status($t->http("PUT /admin/maintenance HTTP/1.0\r\nHost: l\r\n"
    . "Content-Length: 0\r\n\r\n")), 200, 'maintenance on');
is(get($t, '/healthz'), 503, 'health: 503 in maintenance');
is(status($t->http("DELETE /admin/maintenance HTTP/1.0\r\nHost: l\r\n\r\n")),
    200, 'maintenance off');
is(get($t, '/metrics'), 200, 'metrics');

$t->stop;

# --- 2. clients leaving while their command waits on a stalled Redis -------

my $b = $t->nginx('stalled');
$b->write_secret_file('keys', [ [ k1 => $KEY ] ]);
$b->write_file('ok.txt', "ok\n");
start($b, $STALL, '1s');

my @gone;
for my $req (
    "GET /limited HTTP/1.0\r\nHost: l\r\nX-Citizen-Id: x\r\n\r\n",
    "GET /health HTTP/1.0\r\nHost: l\r\nX-Citizen-Id: x\r\n\r\n",
    "GET /consents/ HTTP/1.0\r\nHost: l\r\nX-Citizen-Id: x\r\n\r\n",
    "PUT /consents/health HTTP/1.0\r\nHost: l\r\nX-Citizen-Id: x\r\n"
        . "Content-Length: 2\r\n\r\n{}",
    "GET /healthz HTTP/1.0\r\nHost: l\r\n\r\n",
    "GET /healthz HTTP/1.0\r\nHost: l\r\n\r\n")
{
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $b->port(0), Proto => 'tcp') or die "connect: $!";
    print $s $req;
    push @gone, $s;
}
sleep 0.5;
close $_ for @gone;

# the commands time out after their clients left; the worker goes on
sleep 2;
is(get($b, '/limited', 'X-Citizen-Id' => 'y'), 200,
    'limit falls back to the local zone after the timeout');
is(get($b, '/health', 'X-Citizen-Id' => 'y'), 503,
    'consent fails closed while Redis does not answer');
is(get($b, '/healthz'), 503, 'health: 503 while Redis does not answer');

$b->stop;

# --- valgrind's verdict ----------------------------------------------------

for my $inst ($t, $b) {
    my $log = $inst->read_file('valgrind.log') // '';
    my $name = $inst->name;

    like($log, qr/Memcheck.*HEAP SUMMARY/s,
        "$name: ran under memcheck to a clean exit");
    unlike($log, qr/Invalid (read|write|free)|uninitialised|Mismatched free|
        overlap/x, "$name: no invalid memory access");

    # nginx itself keeps some allocations to exit; none may be the module's
    my @leaks = grep { /civicgate/ } split /\n(?===\d+== \S)/, $log;
    is(scalar(grep { /definitely lost/ } @leaks), 0,
        "$name: nothing of the module's definitely lost")
        or diag join "\n", @leaks;
}

$t->done_testing;
