#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# A location with a local and a Redis limit decides each request from both:
# concurrent requests that arrive while Redis is slow do not slip past the
# local limit, a request Redis rejects gives back what the local limit
# reserved for it, and so does a request the local fallback rejects.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;

$t->write_secret_file('keys', [ [ k1 => random_key_hex(32) ] ]);
$t->write_file('file.txt', "static\n");
$t->run_redis;

$t->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=10s;

    civicgate_limit_zone $http_x_key zone=remote:1m rate=1r/m store=redis;
    civicgate_limit_zone $http_x_key zone=local:1m rate=1r/m store=local;
    civicgate_limit_zone $http_x_key zone=other:1m rate=1r/m store=local;

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location = /local-strict {
            civicgate_limit zone=remote burst=5 nodelay;
            civicgate_limit zone=local nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /remote-strict {
            civicgate_limit zone=remote nodelay;
            civicgate_limit zone=local burst=3 nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /twice {
            civicgate_limit zone=local burst=1 nodelay;
            civicgate_limit zone=local burst=3 nodelay;
            civicgate_limit zone=other nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /remote {
            civicgate_limit zone=remote burst=5 nodelay;
            civicgate_limit_headers on;
            alias %%TESTDIR%%/file.txt;
        }
        location = /local {
            civicgate_limit zone=local burst=3 nodelay;
            civicgate_limit_headers on;
            alias %%TESTDIR%%/file.txt;
        }
    }
EOF

$t->run;

sub get {
    my ($path, $key) = @_;
    return $t->request($path, headers => [ 'X-Key' => $key ]);
}

sub remaining {
    my ($r) = @_;
    my ($n) = ($r->header('RateLimit') // '') =~ /;r=(\d+);/;
    return $n // -1;
}

# Redis holds every command for a while: all requests of the burst are in
# the worker, their local checks done, before the first reply comes back
sub burst_while_paused {
    my ($path, $key, $n) = @_;
    is(get('/remote', 'warm-up')->status, 200, 'connected to Redis');
    $t->redis_cmd('CLIENT', 'PAUSE', 1500, 'ALL');
    my @raw = http_burst([ map { Civicgate::Test::build_request($path,
        headers => [ 'X-Key' => $key ]) } 1 .. $n ],
        port => $t->port(0), timeout => 15);
    return join ' ', sort map { parse_response($_)->status } @raw;
}

is(burst_while_paused('/local-strict', 'a', 4), '200 429 429 429',
    'the local limit (burst 0) admits one of four concurrent requests');
is(remaining(get('/local', 'a')), 2,
    'the local limit was charged once (two of four used)');
is(remaining(get('/remote', 'a')), 4,
    'Redis was charged for the admitted request only (two of six used)');

is(burst_while_paused('/remote-strict', 'b', 3), '200 429 429',
    'the Redis limit (burst 0) admits one of three concurrent requests');
is(remaining(get('/local', 'b')), 2,
    'the local limit kept only the admitted request (two of four used)');

is(get('/remote-strict', 'c')->status, 200, 'first request admitted');
is(get('/remote-strict', 'c')->status, 429, 'Redis rejects the second');
is(get('/remote-strict', 'c')->status, 429, 'and the third');
is(remaining(get('/local', 'c')), 2,
    'the rejected requests cost the local limit nothing');

# one zone twice and another: each zone locked once, every limit charged
is(join(' ', map { get('/twice', 'e')->status } 1 .. 2), '200 429',
    'two limits on one zone and one on another: one request admitted');
is(remaining(get('/local', 'e')), 1,
    'the zone was charged once per limit on it (three of four used)');

$t->stop_redis;

is(get('/remote-strict', 'd')->status, 200,
    'Redis down: first request admitted by the fallback');
is(get('/remote-strict', 'd')->status, 429,
    'Redis down: the fallback rejects the second');
is(remaining(get('/local', 'd')), 2,
    'the rejected request cost the other local limit nothing');

$t->done_testing;
