#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Rate limits against a Redis Cluster (3 masters, 3 replicas):
#
# - a store=redis limit holds its exact count for keys on each master,
#   its state in the key's master; keys on different masters are
#   independent;
# - a request whose two limits have keys in different slots is decided
#   by one call per slot: admitted only if both admit, and a rejection by
#   one gives back what the other charged (its next requests see only
#   the admitted ones);
# - concurrent requests for keys on many slots, batched by a worker, are
#   all decided right, with no CROSSSLOT;
# - a master that does not answer (CLIENT PAUSE) holds up only the checks
#   of its keys: a worker does not wait for its batch to send the next;
# - a sync= reconciliation of keys on many slots: one call per slot, each
#   key's count in its master;
# - three gateways on one cluster hold one cluster-wide limit: exact
#   (at most b + 1 + r*W) and sync= (within its documented bound);
# - the master of a limited key killed under load: the zone's on_error=
#   policy applies (deny: 503), and Redis decides again within the
#   documented time after the replica's promotion (seen by polling its
#   ROLE): 1.5 s here, the 500 ms map reread and a connection's setup
#   with a margin for a loaded machine.
#
# Keys are chosen by the master of their slot: without a secret file, the
# Redis key of a key value V in zone Z is cg:{l:HEX}:Z, HEX the first 16
# bytes of SHA-256(V).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Digest::SHA qw(sha256_hex);
use Time::HiRes qw(time sleep);
use POSIX ();
use Civicgate::Test qw(:all);
use Civicgate::Cluster;

my $t = Civicgate::Test->new;
my %gw = (a => $t, b => $t->nginx('b'), c => $t->nginx('c'));
my %PORT = (a => $t->port(0), b => $t->port('b'), c => $t->port('c'),
    d => $t->port('d'));
my $d = $t->nginx('d');

my $RUN = sprintf '%x', int(rand(2**31));
my $RATE = 20;          # r/s, the hammered zones
my $B = 5;
my $S = 0.1;            # sync interval
my $D = 0.2;            # the Redis timeout
my $N = 3;

my $C = Civicgate::Cluster->start($t, masters => 3, replicas => 1);
my $seeds = join ' ', $C->seed_urls;
my $LOCATIONS = join '', map { limit_location(@$_) } [ '/slow', slow => 3 ],
    [ '/two', za => 5, zb => 1 ], [ '/za', za => 5 ], [ '/pair', pair => 1 ],
    [ '/exact', exact => $B ], [ '/sync', synced => $B ],
    [ '/slowsync', slowsync => 3 ], [ '/fo', fo => 100000 ];
my $SLOW = limit_location('/slow', slow => 3);

for my $name (sort keys %gw) {
    my $n = $gw{$name};
    my $port = $name eq 'a' ? 'PORT_0' : "PORT_$name";
    $n->write_file('file.txt', "static\n");
    $n->write_nginx_conf(<<"EOF", worker_processes => 2);
    civicgate_redis $seeds mode=cluster timeout=200ms;

    civicgate_limit_zone \$http_x_key zone=slow:1m rate=6r/m;
    civicgate_limit_zone \$http_x_key zone=za:1m rate=6r/m;
    civicgate_limit_zone \$http_x_other zone=zb:1m rate=6r/m;
    civicgate_limit_zone \$http_x_key zone=pair:1m rate=6r/m;
    civicgate_limit_zone \$http_x_key zone=exact:1m rate=${RATE}r/s;
    civicgate_limit_zone \$http_x_key zone=synced:1m rate=${RATE}r/s
                         sync=100ms;
    civicgate_limit_zone \$http_x_key zone=fo:1m rate=1r/m on_error=deny;
    civicgate_limit_zone \$http_x_key zone=slowsync:1m rate=6r/m sync=100ms;

    server {
        listen 127.0.0.1:%%$port%% reuseport;
        server_name localhost;

        add_header X-Limit-Status \$civicgate_limit_status always;

$LOCATIONS
        location = /metrics {
            civicgate_metrics;
        }
    }
EOF
    # the failover below is expected
    $n->allow_log(qr/redis|Redis/);
}

# one worker: every request in one worker's batches
$d->write_file('file.txt', "static\n");
$d->write_nginx_conf(<<"EOF", worker_processes => 1);
    civicgate_redis $seeds mode=cluster timeout=200ms;
    civicgate_limit_zone \$http_x_key zone=slow:1m rate=6r/m;

    server {
        listen 127.0.0.1:%%PORT_d%%;
        server_name localhost;

$SLOW
    }
EOF
$d->allow_log(qr/redis|Redis/);

$gw{$_}->run for sort keys %gw;
$d->run;

sub rkey {
    my ($value, $zone) = @_;
    return 'cg:{l:' . substr(sha256_hex($value), 0, 32) . "}:$zone";
}

sub master_of_key { $C->master_of_slot($C->key_slot(rkey(@_))) }

sub get {
    my ($g, $path, @h) = @_;
    return parse_response(http_get($path, port => $PORT{$g},
        headers => [ @h ]));
}

sub statuses {
    my ($g, $path, $n, @h) = @_;
    return join ' ', map { get($g, $path, @h)->status } 1 .. $n;
}

sub metric_of {
    my ($g, $name, %l) = @_;
    return metric($t->metrics(port => $PORT{$g}) // {}, $name, %l) // 0;
}

# a key value of the zone per master: { port => value }
sub per_master {
    my ($zone, $prefix) = @_;
    my %by;
    for my $i (1 .. 200) {
        my $v = "$prefix-$i";
        $by{ master_of_key($v, $zone) } //= $v;
        last if keys %by == 3;
    }
    return \%by;
}

# the gateways' workers know the slot map
ok($t->wait_until(sub {
        (grep { get($_, '/slow', 'X-Key' => "warm-$RUN-$_")->status == 200 }
            sort keys %gw) == $N }, timeout => 15),
    'every gateway decides with the cluster');

###########################################################################
# exact counts on every master; keys on different masters independent

{
    my $by = per_master('slow', "slow-$RUN");
    is(scalar keys %$by, 3, 'a key value on each of the 3 masters');

    for my $m (sort { $a <=> $b } keys %$by) {
        my $v = $by->{$m};
        is(statuses('a', '/slow', 6, 'X-Key' => $v),
            '200 200 200 200 429 429',
            "key on master $m: burst + 1 admitted, then rejected");
        my $tat = $C->query($m, 'GET', rkey($v, 'slow'));
        ok(defined $tat && !ref $tat && $tat =~ /^\d+$/,
            "key on master $m: its state is on that master");
    }

    # the others still have their own limit after one is exhausted
    my @m = sort { $a <=> $b } keys %$by;
    is(statuses('b', '/slow', 1, 'X-Key' => $by->{ $m[0] }), '429',
        'another gateway sees the exhausted key');
}

###########################################################################
# two limits of a location, keys in different slots

{
    my ($x, $y);
    for my $i (1 .. 200) {
        ($x, $y) = ("two-x-$RUN-$i", "two-y-$RUN-$i");
        last if master_of_key($x, 'za') != master_of_key($y, 'zb');
    }
    isnt(master_of_key($x, 'za'), master_of_key($y, 'zb'),
        'the two keys are on different masters');

    is(statuses('a', '/two', 4, 'X-Key' => $x, 'X-Other' => $y),
        '200 200 429 429',
        'two limits on two masters: admitted only while both admit');

    # za admitted all four; zb rejected two: za's charges for those two
    # were given back, so za has 6 - 2 left, not 6 - 4
    is(statuses('a', '/za', 5, 'X-Key' => $x), '200 200 200 200 429',
        'the rejected requests were given back to the other slot');
}

###########################################################################
# a batch of concurrent requests on many slots

{
    my $mark = $gw{a}->log_mark;
    my @keys = map { "pair-$RUN-$_" } 1 .. 20;
    my %slots = map { $C->key_slot(rkey($_, 'pair')) => 1 } @keys;
    my @req = map { my $k = $_; map {
            "GET /pair HTTP/1.0\r\nHost: localhost\r\nX-Key: $k\r\n\r\n" }
            1 .. 3 } @keys;
    my @raw = http_burst(\@req, port => $PORT{a}, timeout => 10);
    my %adm;
    my %st;
    for my $i (0 .. $#raw) {
        my $r = parse_response($raw[$i]);
        $st{ $r->status }++;
        $adm{ $keys[int($i / 3)] }++ if $r->status == 200;
    }
    is(join(' ', map { "$_:$st{$_}" } sort keys %st), '200:40 429:20',
        sprintf('%d concurrent requests on %d slots: 40 admitted, 20 '
            . 'rejected', scalar @req, scalar keys %slots));
    is((grep { ($adm{$_} // 0) == 2 } @keys), 20,
        'each key: exactly burst + 1 admitted');
    unlike($gw{a}->log_since($mark), qr/CROSSSLOT/, 'no CROSSSLOT');
}

###########################################################################
# a slow master holds up only its own keys

{
    my $by = per_master('slow', "hol-$RUN");
    my ($m1, $m2) = sort { $a <=> $b } keys %$by;
    is(get('d', '/slow', 'X-Key' => $by->{$_})->status, 200,
        "one worker: key on $_ decided") for $m1, $m2;

    is($C->query($m1, 'CLIENT', 'PAUSE', 500, 'ALL'), 'OK',
        "master $m1 paused for 500 ms");
    my $job = $t->start_load(clients => 1, requests => 1, port => $PORT{d},
        path => '/slow', headers => [ 'X-Key' => $by->{$m1} ]);
    sleep 0.05;
    my $t0 = time;
    my $r = get('d', '/slow', 'X-Key' => $by->{$m2});
    my $took = time - $t0;
    my $res = $t->wait_load($job, timeout => 10);
    is($r->status, 200, "key on $m2 decided while $m1 is paused");
    ok($took < 0.12, sprintf('without waiting for the paused master\'s '
        . 'batch (%.3f s; its timeout: 0.2 s)', $took));
    is(join(' ', map { $_->{status} } @{ $res->{results} }), '200',
        "the key on $m1: decided by its fallback (on_error=local)");
    sleep 0.5;
}

###########################################################################
# sync=: a reconciliation of keys on many slots

{
    my $mark = $gw{a}->log_mark;
    my @keys = map { "ss-$RUN-$_" } 1 .. 12;
    my %m = map { master_of_key($_, 'slowsync') => 1 } @keys;
    for my $k (@keys) {
        get('a', '/slowsync', 'X-Key' => $k) for 1, 2;
    }
    sleep 0.5;
    my $ok = 0;
    for my $k (@keys) {
        my $rk = rkey($k, 'slowsync');
        my $p = master_of_key($k, 'slowsync');
        my ($tat, $now) = ($C->query($p, 'GET', $rk), $C->query($p, 'TIME'));
        next unless defined $tat && !ref $tat && ref $now eq 'ARRAY';
        my $backlog = ($tat - ($now->[0] * 1e6 + $now->[1])) / 1e6;
        $ok++ if $backlog > 19 && $backlog <= 20;
    }
    is($ok, 12, sprintf('12 keys on %d masters reconciled: each holds the '
        . 'two requests (a 20 s backlog)', scalar keys %m));
    is(metric_of('a', 'civicgate_limit_syncs_total', zone => 'slowsync',
        result => 'failed'), 0, 'no reconciliation failed');
    unlike($gw{a}->log_since($mark), qr/CROSSSLOT/, 'no CROSSSLOT');
}

###########################################################################
# three gateways, one cluster-wide limit

sub hammer {
    my ($path, $key, $requests) = @_;
    my $l = $t->load_gateways({ map { $_ => $PORT{$_} } keys %gw },
        requests => $requests, path => $path, headers => [ 'X-Key' => $key ]);
    return ($l->{total}, $l->{admitted}, $l->{statuses}, $l->{span});
}

{
    my ($total, $adm, $st, $w) = hammer('/exact', "exact-$RUN", 100);
    my $limit = $B + 1 + $RATE * $w;
    diag(sprintf 'exact: %d admitted in %.2f s (a %d, b %d, c %d); '
        . 'limit %.1f', $total, $w, map({ $adm->{$_} // 0 } qw(a b c)),
        $limit);
    is(join(',', sort grep { $_ != 200 && $_ != 429 } keys %$st), '',
        'exact, 3 gateways: every answer is 200 or 429');
    ok($total <= $limit + 1, sprintf('exact, 3 gateways: %d admitted <= '
        . 'b + 1 + r*W = %.1f', $total, $limit));
    ok($total >= 0.8 * $limit, sprintf('exact, 3 gateways: %d admitted, '
        . 'about the limit', $total));
}

{
    my ($total, $adm, $st, $w) = hammer('/sync', "sync-$RUN", 100);
    my $exact = $B + 1 + $RATE * $w;
    my $bound = $exact + ($N - 1) * ($B + 1 + 2 * $RATE * ($S + $D));
    diag(sprintf 'sync=100ms: %d admitted in %.2f s (a %d, b %d, c %d); '
        . 'exact %.1f, bound %.1f', $total, $w,
        map({ $adm->{$_} // 0 } qw(a b c)), $exact, $bound);
    ok($total <= $bound, sprintf('sync, 3 gateways: %d admitted <= the '
        . 'bound %.1f', $total, $bound));
    ok($total < 3 * $exact * 0.9, sprintf('sync, 3 gateways: %d admitted, '
        . 'less than three separate limits (%.1f): the state is shared',
        $total, 3 * $exact));
    ok(metric_of('a', 'civicgate_limit_syncs_total', zone => 'synced',
        result => 'ok') > 0, 'sync: reconciliations succeeded');
}

###########################################################################
# the master of a limited key killed: on_error=deny, then Redis again

{
    my $v;
    my $m;
    for my $i (1 .. 200) {
        $v = "fo-$RUN-$i";
        $m = master_of_key($v, 'fo');
        last if $m != master_of_key("slow-$RUN-1", 'slow');
    }
    my $replica = $C->replica_of($m);
    is(get('a', '/fo', 'X-Key' => $v)->status, 200, 'failover key: admitted');
    my $f0 = metric_of('a', 'civicgate_limit_fallbacks_total', zone => 'fo',
        on_error => 'deny');

    # the replica's promotion, as it sees it
    my $rolefile = $t->topdir . "/role-$RUN.txt";
    my $watcher = fork;
    die "fork: $!" unless defined $watcher;
    if ($watcher == 0) {
        my $end = time + 20;
        while (time < $end) {
            my $r = $C->query($replica, 'ROLE');
            if (ref $r eq 'ARRAY' && $r->[0] eq 'master') {
                open my $fh, '>', $rolefile;
                printf $fh "%.6f\n", time;
                close $fh;
                last;
            }
            sleep 0.01;
        }
        POSIX::_exit(0);
    }

    # and a key on another master, which the cluster refuses too while
    # it is down (cluster-require-full-coverage yes, Redis's default)
    my $w;
    for my $i (1 .. 200) {
        $w = "fo-other-$RUN-$i";
        last if master_of_key($w, 'fo') != $m;
    }

    my $job = $t->start_load(clients => 1, requests => 400, interval => 0.01,
        port => $PORT{a}, path => '/fo', headers => [ 'X-Key' => $v ],
        timeout => 3);
    my $other = $t->start_load(clients => 1, requests => 400,
        interval => 0.01, port => $PORT{b}, path => '/fo',
        headers => [ 'X-Key' => $w ], timeout => 3);
    sleep 0.5;
    my $killed = time;
    my ($new, $took) = $C->kill_master($m);
    waitpid($watcher, 0);
    my $res = $t->wait_load($job, timeout => 60);
    my $ores = $t->wait_load($other, timeout => 60);

    my $promoted = do { open my $fh, '<', $rolefile; $fh ? <$fh> : undef };
    chomp $promoted if defined $promoted;
    ok(defined $promoted, sprintf('replica %d promoted %.2f s after the '
        . 'kill', $replica, ($promoted // 0) - $killed));

    my @r = sort { $a->{start} <=> $b->{start} } @{ $res->{results} };
    my @denied = grep { $_->{status} == 503 } @r;
    my $last_denied = @denied ? $denied[-1]{start} + $denied[-1]{elapsed}
                              : undef;
    my @after = grep { $_->{start} > ($last_denied // $killed) } @r;
    my %st;
    $st{ $_->{status} }++ for @r;
    diag(sprintf 'failover: %s; last fallback %.2f s after the kill, '
        . '%.2f s after the promotion',
        join(' ', map { "$_:$st{$_}" } sort keys %st),
        ($last_denied // $killed) - $killed,
        ($last_denied // $killed) - ($promoted // $killed));
    is(join(',', sort grep { $_ != 200 && $_ != 503 } keys %st), '',
        'failover: every answer 200 (Redis) or 503 (on_error=deny)');
    ok(@denied > 0, 'failover: the on_error=deny fallback applied');
    ok(metric_of('a', 'civicgate_limit_fallbacks_total', zone => 'fo',
        on_error => 'deny') > $f0, 'failover: fallbacks counted');
    ok(defined $promoted && defined $last_denied
        && $last_denied - $promoted < 1.5,
        'failover: the fallback ended within 1.5 s of the promotion');
    ok(@after > 10 && !grep({ $_->{status} != 200 } @after),
        'failover: then Redis decides every request');

    my %ost;
    $ost{ $_->{status} }++ for @{ $ores->{results} };
    my @o = sort { $a->{start} <=> $b->{start} } @{ $ores->{results} };
    diag('failover, a key on another master: '
        . join(' ', map { "$_:$ost{$_}" } sort keys %ost));
    ok(($ost{503} // 0) > 0 && ($ost{503} // 0) < @o,
        'failover: a key on another master fell back too, while the '
        . 'cluster was down, and only then');
    ok(@o && $o[-1]{status} == 200, 'failover: that key is decided by '
        . 'Redis again');
    # one interval (60 s) more per request, on the promoted master
    my $tat0 = $C->query($new, 'GET', rkey($v, 'fo')) // 0;
    is(get('a', '/fo', 'X-Key' => $v)->status, 200, 'failover: admitted');
    my $tat1 = $C->query($new, 'GET', rkey($v, 'fo')) // 0;
    is(!ref $tat0 && !ref $tat1 ? $tat1 - $tat0 : 'error', 60_000_000,
        'failover: the promoted master holds the key and charges it');
}

$t->done_testing;
