#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Sharded event streams, "civicgate_event_shards 4" on one redis-server:
# events spread over cg:{events:0} .. cg:{events:3} and never reach
# cg:events; each journey's events all in the stream of its shard
# (CRC-32 of the journey ID, mod 4), in request order, with their stream
# IDs as the timeline's step IDs; a batch of several shards' events in
# one script call; the timeline endpoint and Server-Sent
# Events still work; after a Redis outage the spool drains into the right
# shards, and after a reload to 2 shards into the new layout; nginx -t
# refuses 0 and 1025 shards and a repeated directive.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);
use Civicgate::Status qw(json_of);
use Civicgate::Events qw(crc32 event_shard event_stream);

my $t = Civicgate::Test->new;
my $NS = 4;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

my $API = api_locations(qw(status metrics), { heartbeat => '1s' });
my $HTTP = <<'EOF' . $API . "    }\n";
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=2s;
%%EXTRA%%
    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_journey on;
        civicgate_channel $http_x_channel;
        civicgate_citizen $http_x_citizen_id;

        location /ev {
            civicgate_service shards;
            return 200 "ok\n";
        }
EOF

sub conf {
    my ($extra) = @_;
    (my $h = $HTTP) =~ s/%%EXTRA%%/$extra/;
    $t->write_nginx_conf($h);
}

is(crc32('123456789'), 0xCBF43926, 'CRC-32 check value');

sub shard { event_shard($_[0], $NS) }

sub streams {
    my %by;
    for my $n (0 .. $NS - 1) {
        $by{$n} = $t->redis_stream(event_stream($n));
    }
    return \%by;
}

sub total {
    my $n = 0;
    $n += $t->redis_query('XLEN', event_stream($_)) // 0 for 0 .. $NS - 1;
    return $n;
}

conf("    civicgate_event_shards $NS;\n");
$t->run_redis;
$t->run;

###########################################################################
# A. events spread over the shards, a journey's in its own, in order

my @CH = qw(web sms app counter);
my $NJ = 40;
my @J = map { mint_journey_id($KEY) } 1 .. $NJ;
my %shard_used;
$shard_used{ shard($_) }++ for @J;

my $bad = 0;
for my $k (0 .. $#CH) {
    for my $j (@J) {
        my $r = $t->request("/ev?k=$k", headers => [ 'X-Journey-ID' => $j,
            'X-Channel' => $CH[$k], 'X-Citizen-Id' => "CZ-$j" ]);
        $bad++ unless $r->status == 200
            && ($r->header('X-Journey-ID') // '') eq $j;
    }
}
is($bad, 0, "$NJ journeys, " . scalar(@CH) . ' requests each');

my $N = $NJ * @CH;
ok($t->wait_until(sub { total() >= $N }, timeout => 10),
    "$N events in the $NS streams") or diag 'total ' . total();
is(total(), $N, 'each event once');
is($t->redis_query('EXISTS', 'cg:events'), 0, 'cg:events is not written');

my $by = streams();
is(scalar(grep { @{ $by->{$_} } } 0 .. $NS - 1), scalar(keys %shard_used),
    'every shard a journey maps to has a stream');
cmp_ok(scalar(keys %shard_used), '>=', 3, 'the journeys span the shards');

my ($misplaced, $disorder, $sids) = (0, 0, 0);
for my $n (0 .. $NS - 1) {
    my %seen;
    for my $e (@{ $by->{$n} }) {
        my $j = $e->{f}{journey};
        $misplaced++ unless shard($j) == $n;
        push @{ $seen{$j} }, $e;
    }
    for my $j (keys %seen) {
        my @ch = map { $_->{f}{channel} } @{ $seen{$j} };
        $disorder++ unless "@ch" eq "@CH";
        my @tl = map { $_->{id} } @{ $t->journey_timeline($j) };
        my @ids = map { $_->{id} } @{ $seen{$j} };
        $sids++ unless "@tl" eq "@ids";
    }
}
is($misplaced, 0, 'every event in its journey\'s shard (CRC-32 mod 4)');
is($disorder, 0, 'each journey\'s events in request order');
is($sids, 0, 'timeline step IDs are the shard stream\'s entry IDs');

my $lens = join ' ', map { scalar @{ $by->{$_} } } 0 .. $NS - 1;
diag "events per shard: $lens";

###########################################################################
# A2. outside a cluster a batch stays one script call, whatever its shards

{
    my $evalsha = sub {
        my $info = $t->redis_query('INFO', 'commandstats') // '';
        return $info =~ /^cmdstat_evalsha:calls=(\d+)/m ? $1 : 0;
    };
    my @B = map { mint_journey_id($KEY) } 1 .. 64;
    my %shards = map { shard($_) => 1 } @B;
    my $before = total();
    my $calls = $evalsha->();
    my @out = http_burst([ map { Civicgate::Test::build_request('/ev',
        headers => [ 'X-Journey-ID' => $_, 'X-Channel' => 'web' ]) } @B ],
        port => $t->port(0));
    is(scalar(grep { defined && /^HTTP\/1\.1 200/ } @out), 64,
        '64 concurrent requests of 64 journeys');
    ok($t->wait_until(sub { total() >= $before + 64 }, timeout => 5),
        'their events written');
    my $n = $evalsha->() - $calls;
    cmp_ok($n, '<', 32, "in $n script calls, over " . scalar(keys %shards)
        . ' shards: a call holds events of several streams');
}

###########################################################################
# B. the timeline endpoint and Server-Sent Events

{
    my $j = $J[0];
    my $r = $t->request("/status/journeys/$j");
    is($r->status, 200, 'timeline: 200');
    my $tl = json_of($r->body) // {};
    is(scalar @{ $tl->{steps} // [] }, scalar @CH, 'timeline: every step');
    is_deeply($tl->{channels}, \@CH, 'timeline: the channels in order');

    my $s = $t->sse_open("/status/journeys/$j");
    $s->wait_for(sub { @{ $_[0]->events } >= 1 }, 3);
    my ($snap) = @{ $s->new_events };
    is($snap && $snap->{event}, 'snapshot', 'SSE: snapshot first');
    $t->request('/ev', headers => [ 'X-Journey-ID' => $j,
        'X-Channel' => 'phone' ]);
    $s->wait_for(sub { @{ $_[0]->events } >= 2 }, 3);
    my ($e) = @{ $s->new_events };
    is($e && $e->{event}, 'step', 'SSE: the new step, live');
    my $last = $t->redis_stream(event_stream(shard($j)))->[-1];
    is($e && $e->{id}, $last->{id}, 'SSE: its id, the shard stream\'s');
    is($last->{f}{journey}, $j, 'the step is in the journey\'s shard');
    is($t->redis_query('ZSCORE', 'cg:watched', $j) ? 1 : 0, 1,
        'the followed journey is in the watch registry');
    $s->close;
}

###########################################################################
# C. the spool drains into the right shards after an outage

{
    $t->stop_redis;
    sleep 0.3;
    my @K = map { mint_journey_id($KEY) } 1 .. 24;
    for my $k (0 .. 2) {
        $t->request('/ev', headers => [ 'X-Journey-ID' => $_,
            'X-Channel' => $CH[$k] ]) for @K;
    }
    my $spooled = metric($t->metrics, 'civicgate_events_total',
        result => 'spooled') // 0;
    cmp_ok($spooled, '>=', 72, 'Redis down: the events are spooled');

    $t->run_redis;
    ok($t->wait_until(sub { total() >= 72 }, timeout => 10),
        'Redis back: the spool is written') or diag 'total ' . total();
    is(total(), 72, 'each spooled event once');
    my $by = streams();
    my ($wrong, $order) = (0, 0);
    my %of;
    for my $n (0 .. $NS - 1) {
        for my $e (@{ $by->{$n} }) {
            $wrong++ unless shard($e->{f}{journey}) == $n;
            push @{ $of{ $e->{f}{journey} } }, $e->{f}{channel};
        }
    }
    $order++ for grep { "@{ $of{$_} // [] }" ne "@CH[0 .. 2]" } @K;
    is($wrong, 0, 'drained events in their journeys\' shards');
    is($order, 0, 'in order, each journey');
    is($t->redis_query('EXISTS', 'cg:events'), 0, 'still no cg:events');
}

###########################################################################
# C2. a reload to 2 shards while events wait in the spool: they are written
#     by the new layout, each journey's to its new shard

{
    $t->stop_redis;
    sleep 0.3;
    my @K = map { mint_journey_id($KEY) } 1 .. 16;
    $t->request('/ev', headers => [ 'X-Journey-ID' => $_,
        'X-Channel' => 'web' ]) for @K;
    conf("    civicgate_event_shards 2;\n");
    ok($t->reload, 'reload: civicgate_event_shards 2');
    $t->run_redis;
    my $two = sub {
        my $n = 0;
        $n += $t->redis_query('XLEN', event_stream($_)) // 0 for 0, 1;
        return $n;
    };
    ok($t->wait_until(sub { $two->() >= 16 }, timeout => 10),
        'the spooled events are written after the reload');
    my $wrong = 0;
    for my $n (0, 1) {
        $wrong += grep { crc32($_->{f}{journey}) % 2 != $n }
            @{ $t->redis_stream(event_stream($n)) };
    }
    is($wrong, 0, 'each in its journey\'s shard of two');
    is(($t->redis_query('XLEN', event_stream(2)) // 0)
        + ($t->redis_query('XLEN', event_stream(3)) // 0), 0,
        'none in the streams of the old layout');
}

$t->stop;

###########################################################################
# D. the directive

{
    for my $n ('0', '1025', 'four') {
        conf("    civicgate_event_shards $n;\n");
        my ($rc, $out) = $t->test_config;
        isnt($rc, 0, "nginx -t refuses civicgate_event_shards $n");
    }
    conf("    civicgate_event_shards 4;\n    civicgate_event_shards 8;\n");
    my ($rc, $out) = $t->test_config;
    like($out, qr/"civicgate_event_shards" directive is duplicate/,
        'nginx -t refuses a repeated civicgate_event_shards');
    for my $n (1, 1024) {
        conf("    civicgate_event_shards $n;\n");
        ($rc, $out) = $t->test_config;
        is($rc, 0, "civicgate_event_shards $n is accepted") or diag $out;
    }
    # with a cluster too, from one stream (cg:{events:0}) up
    (my $h = $HTTP) =~ s/%%EXTRA%%/    civicgate_event_shards 1;\n/;
    $h =~ s/(civicgate_redis redis:\S+)/$1 mode=cluster/;
    $t->write_nginx_conf($h);
    ($rc, $out) = $t->test_config;
    is($rc, 0, 'mode=cluster with civicgate_event_shards 1 is accepted')
        or diag $out;
}

$t->done_testing;
