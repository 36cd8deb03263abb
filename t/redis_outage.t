#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Redis outages lose no journey event: while Redis is down the requests
# are answered at once and the events wait in the shared-memory spool;
# when Redis is back they are written, oldest first, in request order.
# A Redis restart in the middle of a load loses nothing (distinct eids =
# answered requests).  A full spool drops the NEWEST events, counts and
# logs them.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $JRE = journey_id_re();

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

# channels s00 .. s29 number the requests of a journey: the channel
# sequence of a journey's events is the order of its requests
my $CHANNELS = join ' ', map { sprintf 's%02d', $_ } 0 .. 29;

my $HTTP = <<"EOF";
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;
    civicgate_channels web $CHANNELS;
%%EXTRA%%
    server {
        listen 127.0.0.1:%%PORT_LISTEN%%;
        server_name localhost;

        civicgate_journey on;
        civicgate_channel \$http_x_channel;

        location /seq {
            civicgate_service seq;
            return 200 "ok\\n";
        }
        location /load {
            civicgate_service load;
            return 200 "ok\\n";
        }
        location /full {
            civicgate_service full;
            return 200 "ok\\n";
        }
        location = /metrics {
            civicgate_events off;
            civicgate_metrics;
        }
    }
EOF

sub conf_for {
    my ($n, $listen, $extra) = @_;
    (my $h = $HTTP) =~ s/%%EXTRA%%/$extra/;
    $h =~ s/%%PORT_LISTEN%%/%%PORT_${listen}%%/;
    $n->write_nginx_conf($h);
}

sub events_metric {
    my ($n, $result) = @_;
    my $m = $n->metrics(port => $n->port($n->name eq 'main' ? 0 : $n->name));
    return metric($m, 'civicgate_events_total', result => $result);
}

my $URL = 'redis://127.0.0.1:' . $t->port('redis');

$t->run_redis;
conf_for($t, 0, '');
$t->run;

###########################################################################
# A. Redis down: 40 requests of 3 journeys, spooled, then written in order

{
    # the connection works
    my $r = $t->request('/seq', headers => [ 'X-Channel' => 'web' ]);
    is($r->status, 200, 'warm-up request');
    ok($t->wait_until(sub { $t->redis_query('XLEN', 'cg:events') == 1 }),
        'warm-up event written');
    # logged before the worker's connection was ready, it was spooled
    my $spooled0 = events_metric($t, 'spooled');

    my $mark = $t->log_mark;
    $t->stop_redis;

    my @J = map { mint_journey_id($KEY) } 1 .. 3;
    my $N = 40;
    my (@late, $bad, $max);
    $max = 0;
    for my $i (0 .. $N - 1) {
        my $t0 = time;
        my $r = $t->request('/seq', headers => [ 'X-Journey-ID' => $J[$i % 3],
            'X-Channel' => sprintf('s%02d', int($i / 3)) ], timeout => 5);
        my $el = time - $t0;
        $max = $el if $el > $max;
        push @late, sprintf('%d: %.3fs', $i, $el) if $el >= 1;
        $bad++ unless $r->status == 200
            && ($r->header('X-Journey-ID') // '') eq $J[$i % 3];
    }
    ok(!$bad, "Redis down: $N requests answered 200 with their journeys");
    is_deeply(\@late, [], sprintf('Redis down: every request answered in < 1 s'
        . ' (max %.3f s)', $max));

    ok($t->wait_until(sub {
        (events_metric($t, 'spooled') // 0) - $spooled0 >= $N
    }, timeout => 3), 'spooled metric reaches N');
    is(events_metric($t, 'spooled') - $spooled0, $N,
        "events_total{result=spooled} = $N");
    is(events_metric($t, 'written'), 1, 'events_total{result=written} = 1');
    is(events_metric($t, 'dropped'), 0, 'events_total{result=dropped} = 0');

    # stay down a while: the reconnection attempts fail (with backoff)
    sleep 1.5;
    my $down = $t->log_since($mark);
    my @err = grep { /\[error\].*civicgate: redis/ } split /\n/, $down;
    is(scalar @err, 1, 'the connection error is logged once at [error]')
        or diag join "\n", @err;
    like($down, qr/\[info\].*civicgate: redis \Q$URL\E/,
        'further connection errors at [info]');

    my $mark2 = $t->log_mark;
    my $t_up = time;
    $t->run_redis;    # same port, empty
    my $ok = $t->wait_until(sub {
        ($t->redis_query('XLEN', 'cg:events') // 0) >= $N }, timeout => 8);
    my $took = time - $t_up;
    ok($ok, "Redis back: $N events written");
    cmp_ok($took, '<', 4, sprintf('written within a few seconds (%.2f s)',
        $took));

    my $g = $t->redis_stream('cg:events');
    my %eid = map { $_->{f}{eid} => 1 } @$g;
    is(scalar keys %eid, $N, "$N distinct eids");
    is_deeply([ map { "$_->{f}{journey}/$_->{f}{channel}" } @$g ],
        [ map { sprintf '%s/s%02d', $J[$_ % 3], int($_ / 3) } 0 .. $N - 1 ],
        'cg:events: oldest first, in request order');

    for my $k (0 .. 2) {
        my $e = $t->journey_timeline($J[$k]);
        my @want = map { sprintf 's%02d', int($_ / 3) }
            grep { $_ % 3 == $k } 0 .. $N - 1;
        is_deeply([ map { $_->{f}{channel} } @$e ], \@want,
            "journey $k: its events in request order");
        my $s = $t->journey_summary($J[$k]);
        is($s->{events}, scalar @want, "journey $k: summary events");
        is($s->{channels}, join(',', @want), "journey $k: summary channels");
    }

    ok($t->wait_for_log(
        qr/\[notice\].*civicgate: redis \Q$URL\E connected again/,
        since => $mark2, timeout => 2), '[notice] ... connected again');
    is(events_metric($t, 'written'), $N + 1,
        'events_total{result=written} = N + 1');
    is(events_metric($t, 'spooled') - $spooled0, $N, 'spooled unchanged');
}

###########################################################################
# B. Redis restarted in the middle of a load: nothing lost

{
    # Redis with an fsync'ed append-only file: what it acknowledged before
    # the restart is still there after it
    $t->stop_redis;
    $t->run_redis(args => [ '--appendonly', 'yes', '--appendfsync', 'always',
        '--appenddirname', 'aof-b' ]);
    is($t->redis_query('DBSIZE'), 0, 'fresh Redis (with AOF)');

    my $job = $t->start_load(clients => 2, requests => 150, interval => 0.02,
        path => '/load', headers => [ 'X-Channel' => 'web' ]);
    sleep 1;
    $t->stop_redis;
    sleep 0.5;
    $t->run_redis;
    my $res = $t->wait_load($job, timeout => 30);

    is($res->{answered}, 300, 'all 300 requests answered 200')
        or diag explain $res->{statuses};
    cmp_ok($res->{max_elapsed}, '<', 1, sprintf(
        'no request delayed by the restart (max %.3f s)', $res->{max_elapsed}));
    my %sent = map { $_->{journey} => 1 }
        grep { $_->{status} == 200 } @{ $res->{results} };

    my (%eids, %journeys, $last);
    my $done = $t->wait_until(sub {
        %eids = %journeys = ();
        my $g = $t->redis_stream('cg:events');
        for my $e (@$g) {
            next unless ($e->{f}{service} // '') eq 'load';
            $eids{ $e->{f}{eid} } = 1;
            $journeys{ $e->{f}{journey} } = 1;
        }
        scalar(keys %eids) >= $res->{answered};
    }, timeout => 10, interval => 0.25);
    ok($done, 'events of the load arrive');
    is(scalar keys %eids, $res->{answered},
        'distinct eids in cg:events == requests answered');
    my @missing = grep { !$journeys{$_} } keys %sent;
    is(scalar @missing, 0, 'every answered request has its event')
        or diag 'missing journeys: ' . join ' ', @missing[0 .. 4];
    my $m = $t->metrics;
    is(metric($m, 'civicgate_events_total', result => 'dropped'), 0,
        'nothing dropped');
}

###########################################################################
# C. a full spool (32k, about 110 events) drops the newest events

{
    $t->stop;
    $t->stop_redis;

    my $s = $t->nginx('small');
    $s->write_secret_file('keys', [ [ k1 => $KEY ] ]);
    conf_for($s, 'small', "    civicgate_event_buffer 32k;\n");
    $s->run;                 # Redis is down from the start

    my $N = 300;
    my (@J, $bad);
    for my $i (1 .. $N) {
        my $r = $s->request('/full', port => $t->port('small'),
            headers => [ 'X-Channel' => 'web' ]);
        $bad++ unless $r->status == 200;
        push @J, $r->header('X-Journey-ID') // '';
    }
    ok(!$bad, "full spool: $N requests answered 200");

    my $sp = events_metric($s, 'spooled');
    my $dr = events_metric($s, 'dropped');
    is($sp + $dr, $N, "spooled + dropped = $N ($sp + $dr)");
    # 96-byte slots, one per event here
    cmp_ok($sp, '>=', 200, 'a 32k spool holds about 228 events');
    cmp_ok($sp, '<=', 240, 'a 32k spool holds about 228 events (at most)');
    cmp_ok($dr, '>', 0, 'events dropped');
    my @warn = grep { /\[warn\].*civicgate: event buffer full, \d+ journey events dropped/ }
        split /\n/, $s->error_log;
    is(scalar @warn, 1, 'one [warn] "event buffer full, N journey events'
        . ' dropped" within 10 s') or diag join "\n", @warn;

    # empty, no AOF: what it holds next comes from the spool (the gateway
    # may already be writing it)
    $t->run_redis(args => []);
    my %got;
    my $ok = $t->wait_until(sub {
        %got = map { $_->{f}{journey} => 1 } @{ $t->redis_stream('cg:events') };
        keys %got >= $sp;
    }, timeout => 8, interval => 0.25);
    ok($ok, 'the spooled events are written when Redis is back');
    is(scalar keys %got, $sp, 'exactly the spooled events');
    my @kept = grep { $got{$_} } @J;
    is_deeply(\@kept, [ @J[0 .. $sp - 1] ],
        'the oldest events were kept, the newest dropped');
    is(events_metric($s, 'written'), $sp, 'events_total{result=written}');
}

$t->done_testing;
