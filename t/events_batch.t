#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# What a journey event costs Redis (key schema v2, docs/redis-keys.md):
#
# A. Batching: the events of a burst of concurrent requests arrive in a few
#    script calls (INFO commandstats), every one of them once, at most four
#    Redis commands per event, scripts' commands included.
# B. Lazy expiry: a new journey's timeline gets the journey's TTL; a
#    continuing one is refreshed only once ttl/16 has passed since the
#    worker last refreshed it.
# C. The citizen's index is written only for a new journey-citizen pair,
#    scored with the time the journey was first seen with the citizen, and
#    keeps about the newest 64, in Redis's compact encoding.
# D. Watch registry: the steps of a followed journey are published (and
#    reach its event stream live); a journey nobody follows publishes
#    nothing.
# E. Compact spool: with Redis down, a 32k spool holds 228 events of one
#    96-byte slot, half as many whose channel, service and method take two;
#    both kinds reach Redis unchanged once it is back.

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

my $LONG = 'a-service-name-long-enough-to-need-a-second-slot-of-the-spool';

$t->write_nginx_conf(<<"EOF", worker_processes => 1);
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=200ms;
    civicgate_event_buffer 32k;

    server {
        listen 127.0.0.1:%%PORT_0%% backlog=1024;
        server_name localhost;

        civicgate_journey on ttl=16s;
        civicgate_channel \$http_x_channel;
        civicgate_citizen \$http_x_citizen_id;

        location /e {
            civicgate_service batch;
            return 200 "ok\\n";
        }
        location /wide {
            civicgate_service $LONG;
            return 200 "ok\\n";
        }
        location /status/ {
            civicgate_events off;
            civicgate_status;
            civicgate_status_heartbeat 1s;
        }
        location = /metrics {
            civicgate_events off;
            civicgate_metrics;
        }
    }
EOF

$t->run_redis;
$t->run;

sub stats {
    my $info = $t->redis_query('INFO', 'commandstats') // '';
    my %c;
    $c{$1} = $2 while $info =~ /^cmdstat_([\w|]+):calls=(\d+)/mg;
    return \%c;
}

sub delta {
    my ($before, $after, @cmds) = @_;
    my $n = 0;
    $n += ($after->{$_} // 0) - ($before->{$_} // 0) for @cmds;
    return $n;
}

# what the gateway runs for events, scripts' commands included
my @EVENT_CMDS = qw(evalsha xadd rpush expire ltrim zadd zremrangebyrank
    zmscore publish);

sub citizen { 'CZ-' . unpack('H*', random_bytes(6)) }

###########################################################################
# A. a burst: few script calls, at most four commands per event

{
    my $N = 400;
    my @cz = map { citizen() } 1 .. 20;
    my $before = stats();
    my $len0 = $t->redis_query('XLEN', 'cg:events') // 0;
    # half new journeys, half continuing the first 200
    my @first = http_burst([ map { Civicgate::Test::build_request("/e?i=$_",
        headers => [ 'X-Channel' => 'web', 'X-Citizen-Id' => $cz[$_ % 20] ]) }
        1 .. $N / 2 ], port => $t->port(0), timeout => 20);
    my @j = map { parse_response($_)->header('X-Journey-ID') // '' } @first;
    is(scalar(grep { $_ =~ $JRE } @j), $N / 2, 'the first half: new journeys');
    my @second = http_burst([ map { Civicgate::Test::build_request("/e?c=$_",
        headers => [ 'X-Channel' => 'app', 'X-Journey-ID' => $j[$_ - 1],
            'X-Citizen-Id' => $cz[$_ % 20] ]) } 1 .. $N / 2 ],
        port => $t->port(0), timeout => 20);
    is(scalar(grep { parse_response($_)->status == 200 } @second), $N / 2,
        'the second half: continuing journeys answered');

    ok($t->wait_until(sub {
        ($t->redis_query('XLEN', 'cg:events') // 0) >= $len0 + $N },
        timeout => 10), "all $N events in cg:events");
    my $after = stats();
    my $calls = delta($before, $after, 'evalsha');
    cmp_ok($calls, '<=', $N / 8, "$N events in $calls script calls");
    my $cmds = delta($before, $after, @EVENT_CMDS);
    cmp_ok($cmds / $N, '<=', 4, sprintf('%.2f Redis commands per event '
        . '(at most 4)', $cmds / $N));
    is(scalar(grep { $t->journey_length($_) == 2 } @j), $N / 2,
        'every journey has its two events in its timeline');
    is(metric($t->metrics, 'civicgate_events_total', result => 'written'),
        $N, "events_total{result=written} = $N");
}

###########################################################################
# B. lazy expiry (ttl=16s: refreshed at most once a second)

my $C = citizen();
my $J;
{
    my $before = stats();
    my $r = $t->request('/e', headers => [ 'X-Channel' => 'web',
        'X-Citizen-Id' => $C ]);
    $J = $r->header('X-Journey-ID');
    my $key = "cg:{j:$J}:timeline";
    ok($t->wait_until(sub { $t->journey_length($J) == 1 }), 'a new journey');
    my $p1 = $t->redis_query('PTTL', $key);
    cmp_ok($p1, '>', 15000, "a new journey's timeline expires in ttl ($p1 ms)");
    my $mid = stats();
    is(delta($before, $mid, 'expire'), 2,
        'new journey: its timeline and the citizen index expire (2 EXPIRE)');

    sleep 0.4;
    $t->request('/e', headers => [ 'X-Channel' => 'web', 'X-Journey-ID' => $J,
        'X-Citizen-Id' => $C ]);
    ok($t->wait_until(sub { $t->journey_length($J) == 2 }), 'a second event');
    my $p2 = $t->redis_query('PTTL', $key);
    cmp_ok($p2, '<', $p1 - 300, "within ttl/16: the expiry is left ($p2 ms)");
    my $mid2 = stats();
    is(delta($mid, $mid2, 'expire', 'zadd'), 0, 'no EXPIRE, no ZADD');

    sleep 0.8;
    $t->request('/e', headers => [ 'X-Channel' => 'web', 'X-Journey-ID' => $J,
        'X-Citizen-Id' => $C ]);
    ok($t->wait_until(sub { $t->journey_length($J) == 3 }), 'a third event');
    my $p3 = $t->redis_query('PTTL', $key);
    cmp_ok($p3, ">", $p2, "past ttl/16: the expiry is refreshed ($p3 ms)");
    my $ci = $t->redis_query('PTTL', "cg:{c:" . pseudonym($KEY, $C)
        . "}:journeys");
    cmp_ok($ci, '>', 15000, "and the citizen's index with it ($ci ms)");
}

###########################################################################
# C. the citizen index: new pairs only, first seen

{
    my $P = pseudonym($KEY, $C);
    my $z = $t->redis_query('ZRANGE', "cg:{c:$P}:journeys", 0, -1,
        'WITHSCORES');
    my $tl = $t->journey_timeline($J);
    is_deeply($z, [ $J, $tl->[0]{f}{time} ],
        'the journey, scored with its first event with the citizen');

    my $before = stats();
    $t->request('/e', headers => [ 'X-Channel' => 'web', 'X-Journey-ID' => $J,
        'X-Citizen-Id' => $C ]);
    my $C2 = citizen();
    $t->request('/e', headers => [ 'X-Channel' => 'web', 'X-Journey-ID' => $J,
        'X-Citizen-Id' => $C2 ]);
    $t->request('/e', headers => [ 'X-Channel' => 'web', 'X-Journey-ID' => $J,
        'X-Citizen-Id' => $C2 ]);
    ok($t->wait_until(sub { $t->journey_length($J) == 6 }), 'three more events');
    is(delta($before, stats(), 'zadd'), 1,
        'one ZADD: the pair with the second citizen only');
    my $P2 = pseudonym($KEY, $C2);
    is_deeply($t->redis_query('ZRANGE', "cg:{c:$P2}:journeys", 0, -1),
        [ $J ], "the second citizen's index has the journey");
    is_deeply($t->redis_query('ZRANGE', "cg:{c:$P}:journeys", 0, -1,
        'WITHSCORES'), $z, "the first citizen's index is unchanged");

    # 200 journeys of one citizen: the index keeps about the newest 64
    my $C3 = citizen();
    my @j3;
    for (1 .. 200) {
        push @j3, $t->request('/e', headers => [ 'X-Channel' => 'web',
            'X-Citizen-Id' => $C3 ])->header('X-Journey-ID');
    }
    ok($t->wait_until(sub { $t->journey_length($j3[-1]) == 1 }),
        '200 journeys of a third citizen');
    my $K3 = 'cg:{c:' . pseudonym($KEY, $C3) . '}:journeys';
    my $n3 = $t->redis_query('ZCARD', $K3);
    ok($n3 >= 64 && $n3 < 128, "its index holds $n3 of them (64 and a few)");
    is($t->redis_query('OBJECT', 'ENCODING', $K3), 'listpack',
        'in Redis\'s compact encoding');
    ok(defined $t->redis_query('ZSCORE', $K3, $j3[-1]),
        'the newest journey among them');
}

###########################################################################
# D. the watch registry

{
    my $r = $t->request('/e', headers => [ 'X-Channel' => 'web' ]);
    my $W = $r->header('X-Journey-ID');
    $r = $t->request('/e', headers => [ 'X-Channel' => 'web' ]);
    my $U = $r->header('X-Journey-ID');
    ok($t->wait_until(sub { $t->journey_length($W) && $t->journey_length($U) }),
        'two journeys');

    my $s = $t->sse_open("/status/journeys/$W");
    $s->wait_for(sub { @{ $_[0]->events } >= 1 }, 3);
    is(($s->events->[0] // {})->{event}, 'snapshot', 'following one of them');
    my $score = $t->redis_query('ZSCORE', 'cg:watched', $W);
    my $now = int(time * 1000);
    ok(defined $score && $score > $now + 60000 && $score <= $now + 91000,
        'cg:watched: the followed journey, until about 90 s from now')
        or diag $score;
    ok(!defined $t->redis_query('ZSCORE', 'cg:watched', $U),
        'cg:watched: not the other one');

    my $before = stats();
    $t->request('/e', headers => [ 'X-Channel' => 'sms', 'X-Journey-ID' => $U ]);
    $t->request('/e', headers => [ 'X-Channel' => 'sms', 'X-Journey-ID' => $U ]);
    $t->request('/e', headers => [ 'X-Channel' => 'app', 'X-Journey-ID' => $W ]);
    $s->wait_for(sub { @{ $_[0]->events } >= 2 }, 3);
    my $step = $s->events->[1] // {};
    is($step->{event}, 'step', 'the followed journey: its step, live');
    ok($t->wait_until(sub { $t->journey_length($U) == 3 }),
        'the other journey: its events written');
    is(delta($before, stats(), 'publish'), 1,
        'one PUBLISH: the followed journey\'s step only');
    is($step->{id}, $t->journey_timeline($W)->[-1]{id},
        'the step id is the SID of its timeline entry');
    $s->close;
}

###########################################################################
# E. the compact spool

{
    $t->stop_redis;
    # the worker sees its connection closed
    sleep 0.3;
    my $sp0 = metric($t->metrics, 'civicgate_events_total',
        result => 'spooled') // 0;
    my $dr0 = metric($t->metrics, 'civicgate_events_total',
        result => 'dropped') // 0;
    my $Cz = citizen();
    my (@narrow, @wide);
    for (1 .. 100) {
        my $r = $t->request('/e', headers => [ 'X-Channel' => 'web',
            'X-Citizen-Id' => $Cz ]);
        push @narrow, $r->header('X-Journey-ID');
    }
    for (1 .. 100) {
        my $r = $t->request('/wide', headers => [ 'X-Channel' => 'counter' ]);
        push @wide, $r->header('X-Journey-ID');
    }
    my $m = $t->metrics;
    my $sp = (metric($m, 'civicgate_events_total', result => 'spooled') // 0)
        - $sp0;
    my $dr = (metric($m, 'civicgate_events_total', result => 'dropped') // 0)
        - $dr0;
    # 32k: 228 slots; 100 events of one slot, then 64 of two
    is($sp, 164, '32k holds 100 one-slot events and 64 two-slot ones');
    is($dr, 36, 'the other 36 dropped');

    $t->run_redis;
    ok($t->wait_until(sub {
        ($t->redis_query('XLEN', 'cg:events') // 0) >= $sp }, timeout => 10),
        'Redis back: the spooled events are written');
    my %by = map { $_->{f}{journey} => $_->{f} }
        @{ $t->redis_stream('cg:events') };
    my $P = pseudonym($KEY, $Cz);
    is(scalar(grep { my $f = $by{$_};
        $f && $f->{citizen} eq $P && $f->{service} eq 'batch'
        && $f->{channel} eq 'web' && $f->{method} eq 'GET'
        && $f->{status} eq '200' && $f->{eid} =~ /^[0-9a-f]{16}$/ } @narrow),
        100, 'one-slot events: every field as logged');
    is(scalar(grep { my $f = $by{$_};
        $f && $f->{citizen} eq '' && $f->{service} eq $LONG
        && $f->{channel} eq 'counter' && $f->{method} eq 'GET' } @wide[0 .. 63]),
        64, 'two-slot events: every field as logged, the oldest 64');
}

$t->done_testing;
