#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Redis outages: the status endpoint keeps answering the last state it saw,
# marked "stale":true with Civicgate-Stale: 1; a gateway that never reached
# Redis answers "unknown"; SSE clients stay connected (heartbeats go on);
# admin changes answer 503; when Redis is back (with its data), stale goes
# false and a change reaches the still-connected SSE client.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);
use Civicgate::Status qw(:all);

my $t = Civicgate::Test->new;

sub conf_for {
    my ($n, $port) = @_;
    $n->write_nginx_conf(status_http(redis => ' timeout=500ms',
        port => $port, status => 'civicgate_status_heartbeat 1s;'));
}

# an append-only file, so that a restarted Redis has the state again
my @AOF = (args => [ '--appendonly', 'yes', '--appendfsync', 'always',
    '--appenddirname', 'aof-status' ]);
$t->run_redis(@AOF);
conf_for($t, 0);
$t->run;

sub admin { admin_service($t, @_) }

sub get {
    my ($port) = @_;
    my $r = $t->request('/status/?lang=en', port => $port // $t->port(0));
    return (json_of($r) // {}, $r);
}

sub heartbeats {
    my ($s) = @_;
    return scalar grep { $_ eq 'heartbeat' } @{ $s->comments };
}

ok($t->wait_until(sub { fresh((get())[0]) }, timeout => 5),
    'not stale once connected');

my $MSG = { id => 'Lambat', en => 'Slow' };
is(admin(PUT => 'tax', { state => 'degraded', message => $MSG })->status,
    200, 'PUT tax degraded');
# the worker learns of the change through pub/sub, a moment later
my ($D1, $R1);
ok($t->wait_until(sub { ($D1, $R1) = get();
    (state_of($D1, 'tax') // '') eq 'degraded' }, timeout => 3),
    'tax degraded');
ok(!defined $R1->header('Civicgate-Stale'), 'no Civicgate-Stale header');

my $S = $t->sse_open('/status/?lang=en');
$S->wait_for(sub { @{ $_[0]->events } >= 1 }, 3);
is(($S->new_events->[0] // {})->{event}, 'snapshot', 'SSE client: snapshot');

###########################################################################
# Redis down

my $COLD = $t->nginx('cold');
{
    $t->stop_redis;
    my ($d, $r);
    ok($t->wait_until(sub { ($d, $r) = get(); stale_of($d) }, timeout => 5),
        'Redis down: "stale":true') or diag $r->raw;
    is($r->status, 200, 'still 200');
    is($r->header('Civicgate-Stale'), '1', 'Civicgate-Stale: 1');
    is(state_of($d, 'tax'), 'degraded', 'the last state: tax degraded');
    my $tax = service_of($d, 'tax');
    is($tax && $tax->{message}, 'Slow', '  with its message');
    is($d->{overall}, 'degraded', 'overall degraded');
    like($r->header('ETag') // '', qr/^"[^"]+"$/, 'an ETag');
    isnt($r->header('ETag'), $R1->header('ETag'),
        'another ETag (the body says stale)');
    is($t->request('/status/?lang=en', headers => [ 'If-None-Match'
        => $R1->header('ETag') ])->status, 200,
        'the ETag from before the outage does not match');

    # the SSE client stays; a new one gets a stale snapshot
    my $hb = heartbeats($S);
    $S->pump(3.2);
    ok(!$S->closed, 'the SSE client stays connected');
    cmp_ok(heartbeats($S) - $hb, '>=', 2, 'heartbeats go on');
    my $n = $t->sse_open('/status/?lang=en');
    $n->wait_for(sub { @{ $_[0]->events } >= 1 }, 3);
    is($n->status, 200, 'a new SSE client during the outage: 200');
    my ($snap) = @{ $n->events };
    is($snap && $snap->{event}, 'snapshot', '  a snapshot');
    my $sd = json_of($snap && $snap->{data}) // {};
    is(stale_of($sd), 1, '  "stale":true');
    is(state_of($sd, 'tax'), 'degraded', '  the last state');
    $n->close;

    # admin changes cannot be made
    for my $m ([ PUT => { state => 'outage' } ], [ DELETE => undef ]) {
        my $a = admin($m->[0], 'tax', $m->[1]);
        is($a->status, 503, "admin $m->[0] during the outage: 503");
        like($a->header('Content-Type') // '',
            qr{^application/problem\+json\b}, '  problem+json');
    }

    # a gateway that never reached Redis: unknown
    conf_for($COLD, 'cold');
    $COLD->run;
    my ($c, $cr) = get($t->port('cold'));
    is($cr->status, 200, 'a gateway started during the outage: 200');
    is(stale_of($c), 1, '  "stale":true');
    is($cr->header('Civicgate-Stale'), '1', '  Civicgate-Stale: 1');
    is_deeply([ map { $_->{state} } @{ $c->{services} || [] } ],
        [ qw(unknown unknown) ], '  every service "unknown"');
}

###########################################################################
# Redis back, with its data

{
    $t->run_redis(@AOF);
    my ($d, $r);
    ok($t->wait_until(sub { ($d, $r) = get(); fresh($d) }, timeout => 8),
        'Redis back: "stale":false');
    ok(!defined $r->header('Civicgate-Stale'), 'no Civicgate-Stale header');
    is(state_of($d, 'tax'), 'degraded', 'tax still degraded');
    ok($t->wait_until(sub { my ($c) = get($t->port('cold'));
        fresh($c) && (state_of($c, 'tax') // '') eq 'degraded' },
        timeout => 8),
        'the cold gateway: the state from Redis, not stale');

    ok(!$S->closed, 'the SSE client is still connected');
    $S->new_events;
    my $t0 = time;
    my $a = admin(PUT => 'tax', { state => 'outage' });
    is($a->status, 200, 'PUT after recovery: 200') or diag $a->raw;
    my $id = (json_of($a) // {})->{id} // '-';
    my $e = $S->wait_for(sub {
        (grep { ($_->{id} // '') eq $id } @{ $_[0]->events })[0] }, 3);
    ok($e, 'the change reaches the SSE client connected all along');
    is($e && $e->{event}, 'service', '  as a service event');
    is((json_of($e && $e->{data}) // {})->{state}, 'outage', '  state outage');
    diag(sprintf 'after recovery: delivered in %.1f ms',
        (($e ? $e->{time} : 99) - $t0) * 1000);
    ($d, $r) = get();
    is(state_of($d, 'tax'), 'outage', 'GET: tax outage');
    is(stale_of($d), 0, 'GET: stale false');
    $S->close;
}

###########################################################################
# Redis restarted without its data: every worker reads the state again

{
    my $S2 = $t->sse_open('/status/?lang=en');
    $S2->wait_for(sub { @{ $_[0]->events } >= 1 }, 3);
    my $seen = @{ $S2->events };

    $t->stop_redis;
    $t->run_redis(args => []);      # empty: no AOF
    my @ports = ($t->port(0), $t->port('cold'));
    for my $i (0 .. 1) {
        ok($t->wait_until(sub {
            # several requests: each worker of the gateway must have it
            for (1 .. 6) {
                my ($d) = get($ports[$i]);
                return 0 if !fresh($d)
                    || ($d->{overall} // '') ne 'operational';
            }
            1 }, timeout => 8),
            ('the gateway', 'the cold gateway')[$i]
            . ': an empty Redis means every service operational');
    }
    my $e = $S2->wait_for(sub {
        my @ev = @{ $_[0]->events };
        (grep { ($_->{event} // '') eq 'snapshot' } @ev[$seen .. $#ev])[0] },
        5);
    ok($e, 'the SSE client gets a new snapshot');
    is((json_of($e && $e->{data}) // {})->{overall}, 'operational',
        '  with every service operational');
    like($t->error_log, qr/status history in Redis was reset/,
        'the reset is logged');
    $S2->close;
}

$t->done_testing;
