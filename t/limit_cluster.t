#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Two gateways sharing one Redis enforce one limit together: requests that
# alternate between them get burst + 1 admitted in all (store=redis), and
# twice that with store=local.  A location with three Redis limits costs
# one EVALSHA per request (INFO commandstats).  Several limits of a request
# are charged together: all or none (Redis and local).
#
# Timing: bursts are sent sequentially and must complete well within one
# interval (500 ms at 2r/s); if one takes longer than half an interval the
# theoretical count (burst + 1 + floor(elapsed / interval), per enforcing
# store) is used with +-1 (reported with a diag).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Digest::SHA qw(sha256_hex);
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $b = $t->nginx('b');

my $B = 4;
my $T = 0.5;
my $RUN = sprintf '%x', int(rand(2**31));

my $SECRET = random_key_hex(32);

my %PORT = (a => $t->port(0), b => $t->port('b'));

for my $i ([ $t, 'PORT_0' ], [ $b, 'PORT_b' ]) {
    my ($n, $port) = @$i;
    $n->write_secret_file('keys', [ [ k1 => $SECRET ] ]);
    $n->write_file('file.txt', "static\n");
    $n->write_nginx_conf(<<"EOF", worker_processes => 2);
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=1s;

    civicgate_limit_zone \$http_x_key zone=shared:1m rate=2r/s store=redis;
    civicgate_limit_zone \$http_x_key zone=own:1m rate=2r/s store=local;
    civicgate_limit_zone \$http_x_key zone=z1:1m rate=100r/s store=redis;
    civicgate_limit_zone \$http_x_key zone=z2:1m rate=100r/s store=redis;
    civicgate_limit_zone \$http_x_key zone=z3:1m rate=100r/s store=redis;
    civicgate_limit_zone \$http_x_key zone=ra:1m rate=2r/s store=redis;
    civicgate_limit_zone \$http_x_key zone=rb:1m rate=2r/s store=redis;
    civicgate_limit_zone \$http_x_key zone=la:1m rate=2r/s store=local;
    civicgate_limit_zone \$http_x_key zone=lb:1m rate=2r/s store=local;

    server {
        listen 127.0.0.1:%%$port%% reuseport;
        server_name localhost;

        add_header X-Limit-Status \$civicgate_limit_status always;

        location = /redis {
            civicgate_limit zone=shared burst=$B nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /local {
            civicgate_limit zone=own burst=$B nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /three {
            civicgate_limit zone=z1 burst=1000 nodelay;
            civicgate_limit zone=z2 burst=1000 nodelay;
            civicgate_limit zone=z3 burst=1000 nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /r-both {
            civicgate_limit zone=ra burst=5 nodelay;
            civicgate_limit zone=rb burst=1 nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /r-a {
            civicgate_limit zone=ra burst=5 nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /l-both {
            civicgate_limit zone=la burst=5 nodelay;
            civicgate_limit zone=lb burst=1 nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /l-a {
            civicgate_limit zone=la burst=5 nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }
EOF
}

$t->run_redis;
$t->run;
$b->run;

sub get {
    my ($gw, $path, $key) = @_;
    return parse_response(http_get($path, port => $PORT{$gw},
        headers => [ 'X-Key' => $key ]));
}

# alternating a, b, a, b ...; returns (statuses, elapsed)
sub alternate {
    my ($path, $key, $n) = @_;
    my @s;
    my $t0 = time;
    for my $i (0 .. $n - 1) {
        push @s, get($i % 2 ? 'b' : 'a', $path, $key)->status;
    }
    return (\@s, time - $t0);
}

sub expect_admitted {
    my ($s, $el, $want, $stores, $name) = @_;
    my $adm = grep { $_ == 200 } @$s;
    my $other = grep { $_ != 200 && $_ != 429 } @$s;
    is($other, 0, "$name: every answer is 200 or 429") or diag "@$s";
    if ($el < $T / 2) {
        is($adm, $want, "$name: $adm admitted (want $want)") or diag "@$s";
    } else {
        my $th = $want + $stores * int($el / $T);
        diag(sprintf '%s: took %.3f s: expecting %d +-1', $name, $el, $th);
        ok(abs($adm - $th) <= 1, "$name: slow run: $adm admitted, "
            . "theoretically $th (+-1)");
    }
    return $adm;
}

###########################################################################
# one limit over two gateways

{
    my $key = "shared-$RUN";
    my ($s, $el) = alternate('/redis', $key, 4 * ($B + 1));
    expect_admitted($s, $el, $B + 1, 1,
        'store=redis, alternating gateways: burst + 1 in all (not per gateway)');
    my @a = @$s[grep { $_ % 2 == 0 } 0 .. $#$s];
    my @bb = @$s[grep { $_ % 2 } 0 .. $#$s];
    ok((grep { $_ == 200 } @a) && (grep { $_ == 200 } @bb),
        'store=redis: both gateways admitted some');
    is(join(' ', @$s[0 .. $B]), join(' ', (200) x ($B + 1)),
        'store=redis: the first burst + 1 passed, whichever gateway')
        if $el < $T / 2;

    my @keys = $t->redis_scan_keys('cg:{l:*}:shared');
    is(scalar @keys, 1, 'one Redis key for the key value, shared by both');
    unlike($keys[0] // '', qr/\Q${\ substr(sha256_hex($key), 0, 32)}\E/,
        'with a secret file the key digest is keyed (not plain SHA-256)');
}

{
    my $key = "own-$RUN";
    my ($s, $el) = alternate('/local', $key, 4 * ($B + 1));
    expect_admitted($s, $el, 2 * ($B + 1), 2,
        'store=local, alternating gateways: burst + 1 per gateway (double)');
    my @a = @$s[grep { $_ % 2 == 0 } 0 .. $#$s];
    my @bb = @$s[grep { $_ % 2 } 0 .. $#$s];
    if ($el < $T / 2) {
        is(scalar(grep { $_ == 200 } @a), $B + 1, 'store=local: gateway a '
            . 'admitted burst + 1');
        is(scalar(grep { $_ == 200 } @bb), $B + 1, 'store=local: gateway b '
            . 'admitted burst + 1');
    }
    is(scalar(my @own = $t->redis_scan_keys('cg:{l:*}:own')), 0,
        'store=local writes nothing to Redis');
}

###########################################################################
# three Redis limits, one round trip

{
    my $key = "three-$RUN";
    # warm up: every worker of both gateways connected (one request each
    # is not guaranteed to reach each worker: send a few)
    get($_ % 2 ? 'b' : 'a', '/three', "warm-$RUN") for 1 .. 8;
    ok($t->wait_until(sub {
            (grep { ($_->{name} // '') =~ /^civicgate-/ }
                $t->redis_clients) >= 2 }, timeout => 5),
        'gateways connected to Redis');

    my $N = 20;
    my $r = $t->redis_query('CONFIG', 'RESETSTAT');
    is($r, 'OK', 'CONFIG RESETSTAT');
    my $ok = 0;
    for my $i (1 .. $N) {
        $ok++ if get($i % 2 ? 'b' : 'a', '/three', $key)->status == 200;
    }
    is($ok, $N, "$N requests through three limits passed");
    my $info = $t->redis_query('INFO', 'commandstats') // '';
    my ($evalsha) = $info =~ /^cmdstat_evalsha:calls=(\d+)/m;
    my ($eval) = $info =~ /^cmdstat_eval:calls=(\d+)/m;
    is($evalsha // 0, $N, "INFO commandstats: $N EVALSHA for $N requests "
        . '(one per request, not one per limit)') or diag $info;
    ok(!$eval, 'no plain EVAL');

    my @keys = $t->redis_scan_keys('cg:{l:*');
    my @mine = grep { /:z[123]$/ } @keys;
    my %tags = map { /^(cg:\{l:[0-9a-f]{32}\})/ ? ($1 => 1) : () } @mine;
    # the warm-up key and this one: two tags, each with all three zones
    is(scalar @mine, 6, 'three keys per key value (z1, z2, z3)')
        or diag "@keys";
    ok(!grep({ my $tag = $_; (grep { index($_, $tag) == 0 } @mine) != 3 }
        keys %tags), 'the keys of one request share a hash tag (one slot)');
}

###########################################################################
# several limits: all or none is charged

for my $store (qw(redis local)) {
    my $p = $store eq 'redis' ? 'r' : 'l';
    my $key = "both-$store-$RUN";
    my $t0 = time;
    my @s = map { get('a', "/$p-both", $key) } 1 .. 6;
    my @st = map { $_->status } @s;
    my @rej = grep { $_->status == 429 } @s;
    my @s2 = map { get('a', "/$p-a", $key)->status } 1 .. 8;
    my $el = time - $t0;
    SKIP: {
        skip "$store: too slow (${el}s) for exact counts", 4
            unless $el < $T / 2;
        is("@st", '200 200 429 429 429 429', "$store: two limits (burst 5 "
            . 'and 1): the stricter one decides');
        like($rej[0] ? ($rej[0]->body // '') : '',
            qr/"violated-policies"\s*:\s*\[\s*"${p}b"\s*\]/,
            "$store: only ${p}b is violated");
        is($rej[0] ? $rej[0]->header('RateLimit-Policy') : undef,
            "\"${p}a\";q=2;w=1, \"${p}b\";q=2;w=1",
            "$store: RateLimit-Policy names both limits, in order");
        # rejected requests charged neither limit: ${p}a holds 2 of 6
        is(scalar(grep { $_ == 200 } @s2), 4, "$store: the rejected "
            . "requests charged ${p}a nothing (4 more of its 6 pass)")
            or diag "@s2";
    }
    if ($store eq 'redis') {
        my @k = $t->redis_scan_keys("cg:{l:*}:ra");
        ok(@k == 1, 'ra key exists');
    }
}

$t->done_testing;
