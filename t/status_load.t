#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# 1000 concurrent SSE clients on one worker: every one gets its snapshot
# and every change; the worker's memory grows by a few KiB per client and
# not at all with the messages (200 changes to all of them); when they go,
# the clients gauge is back to 0.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use POSIX ();
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);
use Civicgate::Status qw(:all);

my $CLIENTS = 1000;
my $CHANGES = 200;
my $PER_CLIENT_MAX = 16 * 1024;        # bytes of worker RSS per client
my $MESSAGES_MAX = 1024 * 1024;        # RSS growth over the 200 changes

# open files: the clients here, and as many in the worker, which inherits
# the limit; raise the soft limit once through the shell if it is low
my $NEED = $CLIENTS + 200;
if ((POSIX::sysconf(POSIX::_SC_OPEN_MAX()) // 0) < $NEED) {
    if (!$ENV{CIVICGATE_NOFILE_RAISED}) {
        $ENV{CIVICGATE_NOFILE_RAISED} = 1;
        exec '/bin/sh', '-c', "ulimit -n $NEED 2>/dev/null; exec \"\$@\"",
            'sh', $^X, $0, @ARGV;
    }
    plan skip_all => "open files limit below $NEED and cannot be raised";
}

my $t = Civicgate::Test->new;
my $T_START = time;

$t->write_nginx_conf(status_http(listen => 'backlog=2048',
    status => 'civicgate_status_heartbeat 60s;'), worker_connections => 4096);

$t->run_redis;
$t->run;

my ($W) = $t->worker_pids;

sub rss {
    open my $fh, '<', "/proc/$W/status" or return undef;
    while (<$fh>) {
        return $1 * 1024 if /^VmRSS:\s+(\d+)\s+kB/;
    }
    return undef;
}

sub gauge { status_clients($t, 'sse') }

my @STATES = qw(degraded outage maintenance operational);
my $nput = 0;

sub change {
    my $svc = $nput % 2 ? 'permits' : 'tax';
    my $state = $STATES[ int($nput / 2) % @STATES ];
    $nput++;
    my $r = admin_service($t, PUT => $svc, { state => $state, message => {
        en => "change $nput", id => "perubahan $nput" } });
    return $r->status == 200 ? (json_of($r) // {})->{id} : undef;
}

# warm up: Redis reached, one stream, one change
ok($t->wait_until(sub { reached_redis($t) }, timeout => 5),
    'the worker reached Redis');
{
    my $s = $t->sse_open('/status/');
    $s->wait_for(sub { @{ $_[0]->events } >= 1 }, 3);
    ok(defined change(), 'a warm-up change');
    $s->wait_for(sub { @{ $_[0]->events } >= 2 }, 3);
    $s->close;
    ok($t->wait_until(sub { (gauge() // -1) == 0 }, timeout => 3),
        'warm-up stream gone');
}
sleep 0.3;
my $RSS0 = rss();

###########################################################################
# 1000 clients, their snapshots

my @C;
{
    my $t0 = time;
    my $ok = eval {
        for my $i (1 .. $CLIENTS) {
            push @C, $t->sse_open('/status/');
            sse_pump(\@C, 0) if $i % 50 == 0;
        }
        1;
    };
    ok($ok, "$CLIENTS clients connected") or diag $@;
    sse_pump(\@C, 20, sub { !grep { !@{ $_->blocks } } @C });
    my $snaps = grep { (($_->events->[0] // {})->{event} // '') eq 'snapshot' }
        @C;
    is($snaps, $CLIENTS, "$CLIENTS snapshots");
    is(scalar(grep { $_->status == 200 } @C), $CLIENTS, 'all 200');
    diag(sprintf '%d clients connected with their snapshots in %.2f s',
        $CLIENTS, time - $t0);
    for my $s (@C) {
        $s->new_events;
        $s->forget;
    }
    is(gauge(), $CLIENTS, "sse clients gauge $CLIENTS");
}

sleep 0.3;
my $RSS1 = rss();

###########################################################################
# one change to all of them

my (%count, %last);

sub collect {
    for my $i (0 .. $#C) {
        next unless @{ $C[$i]->blocks };
        my $ev = $C[$i]->new_events;
        next unless @$ev;
        $count{$i} += grep { ($_->{event} // '') eq 'service' } @$ev;
        $last{$i} = $ev->[-1]{id};
        $C[$i]->forget;
    }
}

{
    my $t0 = time;
    my $id = change();
    ok(defined $id, 'a change');
    sse_pump(\@C, 10, sub { !grep { !@{ $_->events } } @C });
    my $max = 0;
    for my $s (@C) {
        my $e = $s->events->[0] or next;
        $max = $e->{time} - $t0 if $e->{time} - $t0 > $max;
    }
    collect();
    is(scalar(grep { ($last{$_} // '') eq $id && $count{$_} == 1 }
        0 .. $#C), $CLIENTS, "all $CLIENTS clients got the change");
    diag(sprintf 'one change to %d clients: the last got it after %.1f ms',
        $CLIENTS, $max * 1000);
    cmp_ok($max, '<', 3, 'within 3 s for the last of them');
}

sleep 0.3;
my $RSS2 = rss();

###########################################################################
# 200 more changes, in rounds of 10

my $LAST;
{
    my $t0 = time;
    my $bad = 0;
    for my $round (1 .. $CHANGES / 10) {
        for (1 .. 10) {
            my $id = change();
            $bad++ unless defined $id;
            $LAST = $id // $LAST;
        }
        my $want = 1 + $round * 10;
        sse_pump(\@C, 10, sub {
            collect();
            !grep { ($count{$_} // 0) < $want } 0 .. $#C;
        });
    }
    is($bad, 0, "$CHANGES changes made");
    is(scalar(grep { $count{$_} == $CHANGES + 1 && $last{$_} eq $LAST }
        0 .. $#C), $CLIENTS, "every client got all $CHANGES changes, the"
        . ' last one last');
    is(scalar(grep { $_->closed } @C), 0, 'no client was closed');
    diag(sprintf '%d changes to %d clients in %.2f s', $CHANGES, $CLIENTS,
        time - $t0);
}

sleep 0.3;
my $RSS3 = rss();

###########################################################################
# memory

{
    ok(defined $RSS0 && defined $RSS3, 'worker RSS read');
    my $per = ($RSS1 - $RSS0) / $CLIENTS;
    my $msg = $RSS3 - $RSS2;
    diag(sprintf 'worker RSS: %.1f MiB idle, %.1f MiB with %d clients'
        . ' (%.2f KiB each), %.1f MiB after 1 change, %.1f MiB after %d more'
        . ' (%+.1f KiB)', $RSS0 / 1048576, $RSS1 / 1048576, $CLIENTS,
        $per / 1024, $RSS2 / 1048576, $RSS3 / 1048576, $CHANGES, $msg / 1024);
    SKIP: {
        # ASan's redzones and quarantine of freed memory inflate RSS
        skip 'memory budgets: nginx built with sanitizers', 2
            if $ENV{CIVICGATE_SANITIZER};
        cmp_ok($per, '<', $PER_CLIENT_MAX, sprintf('RSS per client %.2f KiB'
            . ' < %d KiB', $per / 1024, $PER_CLIENT_MAX / 1024));
        cmp_ok($msg, '<', $MESSAGES_MAX, sprintf('RSS growth over %d changes'
            . ' %.1f KiB < %d KiB', $CHANGES, $msg / 1024,
            $MESSAGES_MAX / 1024));
    }
}

###########################################################################
# all gone

{
    $_->close for @C;
    ok($t->wait_until(sub { (gauge() // -1) == 0 }, timeout => 5),
        'all closed: sse clients gauge 0') or diag gauge();
    is($t->request('/status/')->status, 200, 'still serving');
    my $took = time - $T_START;
    cmp_ok($took, '<', 60, sprintf('the whole test in %.1f s', $took));
}

$t->done_testing;
