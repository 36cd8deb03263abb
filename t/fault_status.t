#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Status and journey timelines against each fault between nginx and Redis
# (Civicgate::FaultProxy): /status/ always answers at once, with the last
# state, turning "stale" once the fault is noticed (a command timing out,
# a connection closed, a silent subscription); a journey timeline answers
# 503 problem+json within timeout= plus connect_timeout= plus a margin;
# admin changes answer 503; event streams stay open with their heartbeats.
# Once the fault clears the answers are fresh again, timelines answer,
# and changes and journey steps (those made during the fault too) reach the
# streams and the long-polls held since before the fault, and a change
# made through another gateway during the fault is caught up with, on
# /status/ and on the status stream.  Timeline clients
# that leave while their read waits do no harm.
# Without any command, the subscriber's pings find a silent or closed
# connection.  A change made through another gateway while this one's
# Redis trickles its replies (drip) arrives, or the answers turn stale,
# within a ping interval plus timeout=: a trickle of bytes is not an
# answer to the subscriber's PING.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Socket::INET;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);
use Civicgate::Status qw(:all);
use Civicgate::FaultProxy qw(@FAULTS timed_request);

my $t = Civicgate::Test->new;
my $BOUND = 0.2 + 0.2 + 1.0;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

# gateway b reaches Redis directly, not through the proxy
my $B = $t->nginx('b');
my $CONF = <<'EOF';
    civicgate_secret_file %%TOPDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%PORT_@REDIS@%% timeout=200ms connect_timeout=200ms;

    server {
        listen 127.0.0.1:%%PORT_@LISTEN@%%;
        server_name localhost;

        location /tax/ {
            civicgate_journey on;
            civicgate_channel web;
            civicgate_service tax;
            return 200 "tax\n";
        }
        location /permits/ {
            civicgate_service permits;
            return 200 "permits\n";
        }
        location /forms/ {
            civicgate_service forms;
            return 200 "forms\n";
        }
        location /status/ {
            civicgate_status;
            civicgate_status_heartbeat 1s;
        }
        location /civicgate/admin/ {
            civicgate_admin;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }
EOF
for my $g ([ $t, 'redis', '0' ], [ $B, 'real', 'b' ]) {
    (my $c = $CONF) =~ s/\@REDIS\@/$g->[1]/;
    $c =~ s/\@LISTEN\@/$g->[2]/;
    $g->[0]->write_nginx_conf($c);
}

$t->run_redis(port => 'real');
my $p = Civicgate::FaultProxy->start($t, listen => $t->port('redis'),
    to => $t->redis_port);
$t->run;
$B->run;

sub status {
    my ($r, $el) = timed_request($t, '/status/?lang=en');
    return (json_of($r) // {}, $r, $el);
}

sub heartbeats {
    return scalar grep { $_ eq 'heartbeat' } @{ $_[0]->comments };
}

ok($t->wait_until(sub { fresh((status())[0]) }, timeout => 5),
    'fresh once connected');

my $J = $t->request('/tax/a')->header('X-Journey-ID');
ok($t->wait_until(sub { $t->request("/status/journeys/$J")->status == 200 },
    timeout => 5), 'the journey has a timeline');

my $S = $t->sse_open('/status/?lang=en');
ok($S->wait_for(sub { @{ $_[0]->events } >= 1 }, 3), 'a status stream');
$S->new_events;
my $JS = $t->sse_open("/status/journeys/$J");
ok($JS->wait_for(sub { @{ $_[0]->events } >= 1 }, 3), 'a journey stream');
$JS->new_events;

my @STATES = qw(degraded outage maintenance degraded outage maintenance);

# a long-poll on the journey, held: opened with the current ETag, and not
# answered within 0.3 s (else a step came in between: again)
sub hold_longpoll {
    for (1 .. 5) {
        my $r = $t->request("/status/journeys/$J");
        my $lp = $t->sse_open("/status/journeys/$J?wait=20", accept => undef,
            close => 1, headers => [ 'If-None-Match' => $r->header('ETag') ]);
        $lp->pump(0.3);
        return ($lp, scalar @{ (json_of($r) // {})->{steps} || [] })
            unless $lp->head_done;
        $lp->close;
    }
    return ();
}

# a client that sends a request and leaves while it waits
sub leave {
    my ($path) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $t->port(0), Proto => 'tcp', Timeout => 2) or return;
    print $s "GET $path HTTP/1.1\r\nHost: localhost\r\n\r\n";
    sleep 0.05;
    close $s;
}

my $nfault = 0;
for my $f (@FAULTS) {
    my ($label, @mode) = @$f;
    my $state = shift @STATES;
    is(admin_service($t, PUT => 'tax', { state => $state })->status, 200,
        "$label: tax $state");
    is(admin_service($t, PUT => 'permits', { state => 'operational' })
        ->status, 200, "$label: permits operational");
    ok($t->wait_until(sub {
        my ($d) = status();
        fresh($d) && (state_of($d, 'tax') // '') eq $state
            && (state_of($d, 'permits') // '') eq 'operational' },
        timeout => 3), "$label: the worker has them");
    my $hb = heartbeats($S);
    my ($LP, $nsteps) = hold_longpoll();
    ok($LP, "$label: a long-poll on the journey, held");
    my @workers = $t->worker_pids;

    $p->mode(@mode);
    my $t_fault = time;
    my (@late, $max);
    $max = 0;
    my $timed = sub {
        my ($what, $r, $el, $bound) = @_;
        $max = $el if $el > $max;
        push @late, sprintf('%s: %.3f s', $what, $el)
            if $el > ($bound // $BOUND);
        return $r;
    };

    # first, while the connection still looks fine: an admin change, sent
    # to a Redis that may execute it without the answer coming
    my $r = $timed->('admin first', timed_request($t,
        '/civicgate/admin/services/permits', method => 'PUT',
        body => '{"state":"degraded"}'));
    is($r->status, 503, "$label: admin PUT first thing: 503");
    my $first = (json_of($r) // {})->{detail} // '';
    like($first, qr/nothing was changed|may not have been stored/,
        "$label:   says whether the change may have been stored");

    # a timeline is read from Redis: 503
    $r = $timed->('timeline', timed_request($t, "/status/journeys/$J"));
    is($r->status, 503, "$label: a journey timeline: 503") or diag $r->raw;
    is((json_of($r) // {})->{type}, 'urn:civicgate:problem:unavailable',
        "$label:   problem unavailable");

    # the status is answered from memory: at once, the last state, stale
    my ($d, $sr, $el);
    my $stale = $t->wait_until(sub {
        ($d, $sr, $el) = status();
        $timed->('status', $sr, $el, 0.5);
        stale_of($d) }, timeout => 3);
    ok($stale, sprintf('%s: /status/ turns stale (%.2f s after the fault)',
        $label, time - $t_fault));
    is($sr->status, 200, "$label:   200");
    is($sr->header('Civicgate-Stale'), '1', "$label:   Civicgate-Stale: 1");
    is(state_of($d, 'tax'), $state, "$label:   the last state");

    $r = $timed->('admin', timed_request($t, '/civicgate/admin/services/tax',
        method => 'PUT', body => '{"state":"operational"}'));
    is($r->status, 503, "$label: admin PUT: 503");
    is((json_of($r) // {})->{type}, 'urn:civicgate:problem:status-unavailable',
        "$label:   problem status-unavailable");

    # past the subscriber's silence check: still answered, still stale
    my $left = $t_fault + 1.6 - time;
    sleep $left if $left > 0;
    ($d, $sr, $el) = status();
    $timed->('status later', $sr, $el, 0.5);
    is(stale_of($d), 1, "$label: 1.6 s on: still stale");
    $r = $timed->('timeline later', timed_request($t, "/status/journeys/$J"));
    is($r->status, 503, "$label: 1.6 s on: a timeline 503");
    is_deeply(\@late, [], sprintf('%s: every answer in time (max %.3f s)',
        $label, $max));

    # a step during the fault: its event waits in the spool
    $JS->new_events;
    is($t->request('/tax/c', headers => [ 'X-Journey-ID' => $J ])->status,
        200, "$label: a step of the journey during the fault");

    # a change made through gateway b, which reaches Redis
    my $fstate = ('degraded', 'outage', 'maintenance')[$nfault++ % 3];
    is(admin_service($B, PUT => 'forms', { state => $fstate },
        port => $t->port('b'))->status, 200,
        "$label: forms $fstate through gateway b");

    # a timeline client that leaves while its read waits
    leave("/status/journeys/$J");

    $S->pump(0.1);
    $LP->pump(0.1) if $LP;
    ok($LP && !$LP->head_done, "$label: the long-poll is still held");
    ok(!$S->closed && !$JS->closed, "$label: the streams stay open");
    cmp_ok(heartbeats($S), '>', $hb, "$label: heartbeats go on");

    $p->mode('pass');
    my $t0 = time;
    ok($t->wait_until(sub { fresh((status())[0]) }, timeout => 8,
        interval => 0.1), "$label cleared: fresh again");
    diag(sprintf '%s cleared: fresh after %.2f s', $label, time - $t0);
    if ($first =~ /nothing was changed/) {
        my ($d) = status();
        is(state_of($d, 'permits'), 'operational', "$label cleared: the "
            . 'admin change answered "nothing was changed" was not made');
    } else {
        pass("$label cleared: the first admin change may have been made");
    }
    ok($t->wait_until(sub {
        $t->request("/status/journeys/$J")->status == 200 }, timeout => 3),
        "$label cleared: the timeline answers");
    is_deeply([ $t->worker_pids ], \@workers,
        "$label: the same worker all along (no crash)");
    my $lpd = $LP && $LP->wait_for(sub { $_[0]->head_done
        && (json_of($_[0]->body) // {})->{steps} }, 5);
    is($LP && $LP->status, 200, "$label cleared: the held long-poll "
        . 'answers 200');
    is($lpd && scalar @$lpd, ($nsteps // 0) + 1, "$label cleared:   with "
        . 'the step made during the fault');
    $LP->close if $LP;

    # the change made elsewhere during the fault is caught up with, and
    # reaches the stream opened before
    ok($t->wait_until(sub {
        (state_of((status())[0], 'forms') // '') eq $fstate }, timeout => 3),
        "$label cleared: forms $fstate, made through gateway b meanwhile");
    ok($S->wait_for(sub { grep {
        my $d = json_of($_->{data}) // {};
        (($d->{name} // '') eq 'forms' && ($d->{state} // '') eq $fstate)
            || (state_of($d, 'forms') // '') eq $fstate
        } @{ $_[0]->new_events } }, 3),
        "$label cleared:   and reaches the status stream opened before");

    # streams opened before the fault get what happens after it
    $S->new_events;
    my $a = admin_service($t, PUT => 'tax', { state => 'operational' });
    is($a->status, 200, "$label cleared: admin PUT 200");
    my $id = (json_of($a) // {})->{id} // '-';
    ok($S->wait_for(sub { grep { ($_->{id} // '') eq $id }
        @{ $_[0]->events } }, 3), "$label cleared: the change reaches the "
        . 'status stream opened before');
    $t->request('/tax/b', headers => [ 'X-Journey-ID' => $J ]);
    my @steps;
    ok($JS->wait_for(sub {
        push @steps, grep { ($_->{event} // '') eq 'step' }
            @{ $_[0]->new_events };
        @steps >= 2 }, 5), "$label cleared: the step made during the fault "
        . 'and a new one reach the journey stream opened before')
        or diag scalar(@steps) . ' steps';
}

$S->close;
$JS->close;

###########################################################################
# a change made through another gateway while this one's Redis trickles
# (drip): within a ping interval plus timeout= (and a margin) the worker
# either has the change or says its answer is stale

{
    my $state = 'degraded';
    ok($t->wait_until(sub { fresh((status())[0]) }, timeout => 5),
        'drip: fresh before');
    $p->mode('drip', 100);
    my $a = admin_service($B, PUT => 'tax', { state => $state },
        port => $t->port('b'));
    is($a->status, 200, 'drip: a change made through gateway b');
    my $t0 = time;
    my ($d, $ok);
    my $bound = 1 + 0.2 + 1.0;
    $t->wait_until(sub {
        ($d) = status();
        $ok = stale_of($d) || (state_of($d, 'tax') // '') eq $state;
    }, timeout => $bound + 2);
    my $took = time - $t0;
    ok($ok && $took <= $bound, sprintf('drip: the change, or stale, '
        . 'within %.1f s (%s after %.2f s)', $bound,
        $ok ? (stale_of($d) ? 'stale' : 'the change') : 'neither', $took));
    $p->mode('pass');
    ok($t->wait_until(sub { my ($d) = status();
        fresh($d) && (state_of($d, 'tax') // '') eq $state }, timeout => 8),
        'drip cleared: the change, fresh');
}

###########################################################################
# no command at all during the fault (only GET /status/, answered from
# memory): the subscriber's pings notice a silent or closed connection.
# A PING goes every second and is held to timeout=: a PING sent just
# before the fault is found unanswered within a second plus timeout=;
# the bound leaves a margin for a loaded machine.

for my $f (grep { $_->[1] =~ /^(?:blackhole|reset|truncate)$/ } @FAULTS) {
    my ($label, @mode) = @$f;
    ok($t->wait_until(sub { fresh((status())[0]) }, timeout => 8),
        "pings, $label: fresh before");
    $p->mode(@mode);
    my $t0 = time;
    my $bound = 3 * 1 + 1.0;
    my $max = 0;
    my $stale = $t->wait_until(sub {
        my ($d, $r, $el) = status();
        $max = $el if $el > $max;
        stale_of($d) }, timeout => $bound);
    my $took = time - $t0;
    ok($stale, sprintf('pings, %s: stale within %.1f s (%.2f s)',
        $label, $bound, $took));
    cmp_ok($max, '<', 0.5, sprintf('pings, %s: /status/ answered at once '
        . '(max %.3f s)', $label, $max));
    $p->mode('pass');
}
ok($t->wait_until(sub { fresh((status())[0]) }, timeout => 8),
    'pings: fresh after');

$p->stop;
$t->done_testing;
