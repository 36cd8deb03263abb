#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# A subscription that goes silent (Redis stopped without closing the
# socket, as a partition would leave it) is noticed by the subscriber's
# ping within about a second plus the timeout; the connection is made
# again, and the resubscription flushes the consent cache, so a withdrawal
# written meanwhile can never outlive the silence.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;

$t->write_secret_file('keys', [ [ k1 => random_key_hex(32) ] ]);
$t->write_file('ok.txt', "ok\n");
$t->run_redis;

$t->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=200ms;
    civicgate_consent_purposes {
        health "Kesehatan" "Health";
    }
    civicgate_consent_cache zone=consent:1m ttl=60s;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        civicgate_citizen $http_x_citizen_id;

        location /health {
            civicgate_consent health;
            alias %%TESTDIR%%/ok.txt;
        }
        location /consents/ {
            civicgate_consent_api;
        }
    }
EOF
$t->run;

sub flushes { scalar(() = $t->error_log =~ /consent cache flushed/g) }

ok($t->wait_until(sub { flushes() >= 1 }, timeout => 5), 'subscribed: cache flushed');

my $put = $t->http("PUT /consents/health HTTP/1.0\r\nHost: l\r\n"
    . "X-Citizen-Id: silent-1\r\nContent-Length: 0\r\n\r\n");
like($put, qr{^HTTP/1\.[01] 201}, 'consent granted');
like($t->http_get('/health', headers => { 'X-Citizen-Id' => 'silent-1' }),
    qr{^HTTP/1\.[01] 200}, 'granted: passes (and is cached for 60 s)');

my $before = flushes();
kill 'STOP', $t->redis_pid;
my $t0 = time;
ok($t->wait_until(sub { $t->error_log =~ /subscription silent/ },
    timeout => 5),
    'the silent subscription is noticed');
my $noticed = time - $t0;
cmp_ok($noticed, '<', 3, sprintf 'within %.1f s of Redis going silent',
    $noticed);
kill 'CONT', $t->redis_pid;

ok($t->wait_until(sub { flushes() > $before }, timeout => 10),
    'resubscribed: the cache was flushed again');

$t->done_testing;
