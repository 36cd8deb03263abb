#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Synchronised limits (store=redis sync=): three gateways, one Redis.
#
# - Hammered on one key from all three at once, a sync=100ms zone admits
#   no more than the documented bound, b + 1 + r*W + (N - 1) * (b + 1 +
#   2 * r * (S + d)) with d the Redis timeout, while a store=local zone
#   under the same load admits each gateway's own full limit (more than
#   the bound: the reconciliation really shares the state).  Redis sees
#   one script call per interval per gateway, not one per request.
# - Keys and zones are independent; a gateway adopts the backlog the
#   others made once it has reconciled the key.
# - Redis restarted under load: decisions go on locally without waiting,
#   failed reconciliations are counted, the counts reach Redis when it is
#   back, bounded by the local backlog (the key is not locked out for the
#   length of the outage).
# - A reload hands the counts not sent yet to the new workers.
# - Configuration errors.
#
# Timing: the bounds are computed from the measured span of the load;
# sequential checks use a 6r/m zone (10 s per request, so nothing drains
# meanwhile) and wait three reconciliation intervals where they need one.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my %gw = (a => $t, b => $t->nginx('b'), c => $t->nginx('c'));
my %PORT = (a => $t->port(0), b => $t->port('b'), c => $t->port('c'));

my $N = 3;
my $RATE = 20;          # r/s
my $B = 5;              # burst
my $S = 0.1;            # sync interval, s
my $D = 0.2;            # the Redis timeout: a reconciliation's longest delay
my $RUN = sprintf '%x', int(rand(2**31));
my $SECRET = random_key_hex(32);
my $LOCATIONS = join '', map { limit_location(@$_) } [ '/sync', synced => $B ],
    [ '/sync2', synced2 => $B ], [ '/own', own => $B ],
    [ '/slow', slow => 3 ], [ '/lazy', lazy => 3 ];

for my $name (sort keys %gw) {
    my $n = $gw{$name};
    my $port = $name eq 'a' ? 'PORT_0' : "PORT_$name";
    $n->write_secret_file('keys', [ [ k1 => $SECRET ] ]);
    $n->write_file('file.txt', "static\n");
    $n->write_nginx_conf(<<"EOF", worker_processes => 2);
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=200ms;

    civicgate_limit_zone \$http_x_key zone=synced:1m rate=${RATE}r/s
                         store=redis sync=100ms;
    civicgate_limit_zone \$http_x_key zone=synced2:1m rate=${RATE}r/s
                         store=redis sync=100ms;
    civicgate_limit_zone \$http_x_key zone=own:1m rate=${RATE}r/s store=local;
    civicgate_limit_zone \$http_x_key zone=slow:1m rate=6r/m sync=100ms;
    civicgate_limit_zone \$http_x_key zone=lazy:1m rate=6r/m sync=1s;

    server {
        listen 127.0.0.1:%%$port%% reuseport;
        server_name localhost;

$LOCATIONS
        location = /metrics {
            civicgate_metrics;
        }
    }
EOF
    # the outage below is expected
    $n->allow_log(qr/redis|Redis/);
}

$t->run_redis;
$gw{$_}->run for sort keys %gw;

sub get {
    my ($g, $path, $key) = @_;
    return parse_response(http_get($path, port => $PORT{$g},
        headers => [ 'X-Key' => $key ]));
}

sub statuses { join ' ', map { get($_[0], $_[1], $_[2])->status } 1 .. $_[3] }

sub metric_of {
    my ($g, $name, %l) = @_;
    return metric($t->metrics(port => $PORT{$g}) // {}, $name, %l) // 0;
}

sub bound {
    my ($w) = @_;
    return $B + 1 + $RATE * $w + ($N - 1) * ($B + 1 + 2 * $RATE * ($S + $D));
}

# every gateway's workers connected and their scripts loaded
get($_, '/sync', "warm-$RUN") for map { ($_) x 4 } sort keys %gw;
ok($t->wait_until(sub {
        (grep { ($_->{name} // '') =~ /^civicgate-/ } $t->redis_clients)
            >= 2 * $N }, timeout => 10),
    'every worker of the three gateways connected to Redis');

# all three gateways at once on one key, 2 clients each; returns
# (admitted in all, admitted per gateway, statuses seen, span in s)
sub hammer {
    my ($path, $key, $requests) = @_;
    my $l = $t->load_gateways(\%PORT, requests => $requests, path => $path,
        headers => [ 'X-Key' => $key ]);
    return ($l->{total}, $l->{admitted}, $l->{statuses}, $l->{span});
}

###########################################################################
# three gateways, one key: the bound holds, and it is a shared state

my ($sync_total, $sync_span);
{
    is($t->redis_query('CONFIG', 'RESETSTAT'), 'OK', 'CONFIG RESETSTAT');
    my ($total, $adm, $st, $w) = hammer('/sync', "hammer-$RUN", 200);
    my $info = $t->redis_query('INFO', 'commandstats') // '';
    my ($evalsha) = $info =~ /^cmdstat_evalsha:calls=(\d+)/m;
    my $n = 0;
    $n += $_ for values %$st;
    ($sync_total, $sync_span) = ($total, $w);

    is(join(',', sort grep { $_ != 200 && $_ != 429 } keys %$st), '',
        'sync: every answer is 200 or 429');
    my $exact = $B + 1 + $RATE * $w;
    my $bound = bound($w);
    diag(sprintf 'sync=100ms: %d of %d admitted in %.2f s (a %d, b %d, '
        . 'c %d); one exact limit: %.1f; the bound: %.1f; EVALSHA: %s',
        $total, $n, $w, $adm->{a} // 0, $adm->{b} // 0, $adm->{c} // 0,
        $exact, $bound, $evalsha // 0);
    ok($total <= $bound, "sync: admitted $total <= the bound "
        . sprintf('%.1f', $bound));
    ok($total >= 0.5 * $exact, "sync: admitted $total, not far below one "
        . sprintf('exact limit (%.1f)', $exact));
    ok((grep { ($adm->{$_} // 0) > 0 } keys %gw) == $N,
        'sync: every gateway admitted some');
    ok(defined $evalsha && $evalsha <= $N * ($w / $S + 3),
        "sync: $evalsha script calls for $n requests, at most one per "
        . 'interval per gateway');

    my $m = 0;
    $m += metric_of($_, 'civicgate_limit_syncs_total', zone => 'synced',
        result => 'ok') for sort keys %gw;
    ok($m > 0, "civicgate_limit_syncs_total{result=\"ok\"}: $m");
    my $k = metric_of('a', 'civicgate_limit_synced_keys_total',
        zone => 'synced');
    ok($k > 0, "civicgate_limit_synced_keys_total: $k");
}

{
    my ($total, $adm, $st, $w) = hammer('/own', "own-$RUN", 200);
    diag(sprintf 'store=local: %d admitted in %.2f s (a %d, b %d, c %d)',
        $total, $w, $adm->{a} // 0, $adm->{b} // 0, $adm->{c} // 0);
    # each gateway on its own admits its full limit over its span
    for my $g (sort keys %gw) {
        ok(($adm->{$g} // 0) >= $B + 1 + int($RATE * $w * 0.6),
            "store=local: gateway $g admitted its own limit ("
            . ($adm->{$g} // 0) . ')');
    }
    ok($total > bound($w), sprintf 'store=local: %d admitted, beyond the '
        . 'sync bound %.1f: without sync each gateway counts alone', $total,
        bound($w));
    ok($sync_total < $total * ($sync_span + 0.01) / ($w + 0.01) * 0.75,
        "sync admitted clearly less than store=local ($sync_total vs "
        . "$total)");
}

###########################################################################
# keys and zones are independent; the others' backlog is adopted

{
    my $k = "ind-$RUN";
    is(statuses('a', '/slow', "$k-1", 6), '200 200 200 200 429 429',
        'a key: burst + 1 at once on one gateway');
    is(statuses('a', '/slow', "$k-2", 4), '200 200 200 200',
        'another key of the zone: its own burst');
    is(statuses('a', '/sync2', "$k-1", 6), '200 200 200 200 200 200',
        'the same key on another zone: its own limit');

    sleep 3 * $S + $D;
    my @keys = $t->redis_scan_keys("cg:{l:*}:slow");
    ok(@keys >= 2, 'the counts reached Redis: one key per key value');

    # b never saw the key: it decides from rest until it reconciles it
    is(get('b', '/slow', "$k-1")->status, 200,
        'b, first request of the key: decided from rest');
    sleep 3 * $S + $D;
    is(statuses('b', '/slow', "$k-1", 3), '429 429 429',
        'b, once reconciled: the backlog a made rejects (store=local would '
        . 'admit 3 more)');
    my $r = get('c', '/slow', "$k-2");
    is($r->status, 200, 'c: first request of the second key, from rest');
    sleep 3 * $S + $D;
    is(get('c', '/slow', "$k-2")->status, 429, 'c, reconciled: rejected');
}

###########################################################################
# Redis restarted under load

{
    my $k = "outage-$RUN";
    my $f0 = metric_of('a', 'civicgate_limit_syncs_total', zone => 'synced',
        result => 'failed');
    my $job = $t->start_load(clients => 1, requests => 1000, interval => 0.005,
        port => $PORT{a}, path => '/sync', headers => [ 'X-Key' => $k ]);
    sleep 0.5;
    $t->stop_redis;
    sleep 1.2;
    my $f1 = metric_of('a', 'civicgate_limit_syncs_total', zone => 'synced',
        result => 'failed');
    $t->run_redis;
    my $ok0 = metric_of('a', 'civicgate_limit_syncs_total', zone => 'synced',
        result => 'ok');
    ok($t->wait_until(sub { metric_of('a', 'civicgate_limit_syncs_total',
            zone => 'synced', result => 'ok') > $ok0 }, timeout => 8),
        'reconciliations succeed again once Redis is back');
    my @keys = $t->redis_scan_keys("cg:{l:*}:synced");
    my $pttl = @keys == 1 ? $t->redis_query('PTTL', $keys[0]) : -3;
    my $res = $t->wait_load($job, timeout => 60);
    diag(sprintf 'outage load: %d requests in %.2f s', scalar @{
        $res->{results} }, $res->{elapsed});

    ok($f1 > $f0, 'civicgate_limit_syncs_total{result="failed"} counted the '
        . "outage ($f0 -> $f1)");
    is(join(',', sort grep { $_ != 200 && $_ != 429 }
        keys %{ $res->{statuses} }), '',
        'through the outage: every answer is 200 or 429');
    ok($res->{max_elapsed} < 0.5, sprintf 'no request waited on Redis '
        . '(slowest %.3f s)', $res->{max_elapsed});
    ok(($res->{statuses}{200} // 0) > $B + 1 && ($res->{statuses}{429} // 0),
        'the limit went on locally (admitted and rejected)');
    is(scalar @keys, 1, 'the counts reached the restarted Redis')
        or diag "@keys";
    # kept as far as the local backlog: about (burst + 1) intervals,
    # not the outage's 1.2 s of admissions (24 intervals)
    my $max = (($B + 1) * 1000 / $RATE) + 1000 * ($S + $D) + 100;
    ok($pttl > 0 && $pttl <= $max, "the key's backlog after the outage: "
        . "PTTL $pttl ms <= $max ms (bounded by the local backlog)");
}

###########################################################################
# a reload hands the counts over

{
    my $k = "reload-$RUN";
    my $t0 = time;
    my $s = statuses('a', '/lazy', $k, 4);
    ok($gw{a}->reload, 'reload');
    my $el = time - $t0;
    is($s, '200 200 200 200', 'burst + 1 admitted before the reload');
    my @keys;
    ok($t->wait_until(sub { @keys = $t->redis_scan_keys("cg:{l:*}:lazy");
            @keys }, timeout => 6),
        'the counts reached Redis after the reload');
    diag(sprintf 'reload %.2f s after the first request (sync=1s)', $el)
        if $el >= 1;
    my $pttl = @keys ? $t->redis_query('PTTL', $keys[0]) : -3;
    ok($pttl > 500, "all four counted in Redis (PTTL $pttl ms)");
    is(get('a', '/lazy', $k)->status, 429,
        'the new workers decide from the state the old ones left');
}

###########################################################################
# configuration

{
    my $v = $t->nginx('cfg');
    for my $case (
        [ 'store=local sync=100ms', qr/sync= requires store=redis/ ],
        [ 'store=redis sync=never', qr/invalid parameter "sync=never"/ ],
        [ 'store=redis sync=0', qr/invalid parameter "sync=0"/ ],
    ) {
        my ($params, $re) = @$case;
        $v->write_nginx_conf(<<"EOF");
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;
    civicgate_limit_zone \$http_x_key zone=z:1m rate=1r/s $params;
    server {
        listen 127.0.0.1:%%PORT_cfg%%;
        location / { civicgate_limit zone=z; return 204; }
    }
EOF
        my ($rc, $out) = $v->test_config;
        ok($rc != 0 && $out =~ $re, "$params: refused") or diag $out;
    }
}

$t->done_testing;
