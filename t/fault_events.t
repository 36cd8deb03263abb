#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Journey events against each fault between nginx and Redis
# (Civicgate::FaultProxy): responses are never delayed or failed by the
# fault; the events wait in the spool; once the fault clears, every event
# accepted during it is in Redis at least once (cg:events, the journey's
# own stream, a consumer group created before), one eid per request, in
# the order the requests were made, none dropped.  The same after a reload
# during a fault, and when replies are cut while the spool is written
# back.  More events than the connection's window (1024 commands in
# flight) during a stall keep their order too: those in flight when it
# times out go back in front of the newer ones the window had spooled.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);
use Civicgate::FaultProxy qw(@FAULTS timed_request);

my $t = Civicgate::Test->new;

# a Redis fault must not delay a response at all: the events are written
# after the response, in the log phase
my $BOUND = 1.0;
my $PER_FAULT = 8;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

$t->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=200ms connect_timeout=200ms;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        location /e {
            civicgate_journey on;
            civicgate_channel web;
            civicgate_service faults;
            return 200 "ok\n";
        }
        location = /metrics {
            civicgate_journey off;
            civicgate_metrics;
        }
    }
EOF

$t->run_redis(port => 'real');
my $p = Civicgate::FaultProxy->start($t, listen => $t->port('redis'),
    to => $t->redis_port);
$t->run;

# where the order differs: the first requests out of place, then
# cg:events as runs of request indexes
sub diag_order {
    my ($first, $sent, $fault_of) = @_;
    my %pos = map { $first->[$_] => $_ } 0 .. $#$first;
    my %idx = map { $sent->[$_] => $_ } 0 .. $#$sent;
    my $n = 0;
    for my $i (0 .. $#$sent) {
        next if defined $first->[$i] && $first->[$i] eq $sent->[$i];
        diag(sprintf 'request %d (%s) is event %s', $i,
            $fault_of->{ $sent->[$i] } // '?', $pos{ $sent->[$i] } // 'none');
        last if ++$n >= 4;
    }
    my @runs;
    for my $j (@$first) {
        my $i = $idx{$j} // -1;
        if (@runs && $runs[-1][1] == $i - 1) {
            $runs[-1][1] = $i;
        } else {
            push @runs, [ $i, $i ];
        }
    }
    diag('cg:events, first occurrences by request: ' . join ' ',
        map { $_->[0] == $_->[1] ? $_->[0] : "$_->[0]-$_->[1]" } @runs);
}

sub events_total {
    return metric($t->metrics, 'civicgate_events_total', result => $_[0])
        // 0;
}

# every journey of @$sent has an event in cg:events
sub all_written {
    my ($sent) = @_;
    my %in = map { $_->{f}{journey} => 1 }
        @{ $t->redis_stream('cg:events') };
    return !grep { !$in{$_} } @$sent;
}

is($t->redis_query('XGROUP', 'CREATE', 'cg:events', 'agency', '$',
    'MKSTREAM'), 'OK', 'a consumer group, created before any event');

my (@sent, %fault_of);
my $WB = 'cut during the write-back';
my $r = $t->request('/e', headers => [ 'X-Journey-ID' => mint_journey_id($KEY) ]);
push @sent, $r->header('X-Journey-ID');
$fault_of{ $sent[-1] } = 'none';
ok($t->wait_until(sub { all_written(\@sent) }), 'an event before any fault');

for my $f (@FAULTS) {
    my ($label, @mode) = @$f;
    my $spooled = events_total('spooled');
    $p->mode(@mode);
    my $t_fault = time;

    my (@late, $bad, $max, @mine);
    $max = 0;
    for my $i (1 .. $PER_FAULT) {
        my $j = mint_journey_id($KEY);
        my ($r, $el) = timed_request($t, '/e',
            headers => [ 'X-Journey-ID' => $j ]);
        $max = $el if $el > $max;
        push @late, sprintf('%d: %.3f s', $i, $el) if $el > $BOUND;
        $bad++ unless $r->status == 200
            && ($r->header('X-Journey-ID') // '') eq $j;
        push @mine, $j;
        $fault_of{$j} = $label;
        # spread over 1.6 s: past the timeouts and into the reconnections
        sleep 0.2;
    }
    push @sent, @mine;
    ok(!$bad, "$label: $PER_FAULT requests answered 200 with their journey");
    is_deeply(\@late, [], sprintf('%s: each answered within %.1f s '
        . '(max %.3f s)', $label, $BOUND, $max));
    cmp_ok(events_total('spooled') - $spooled, '>', 0,
        "$label: events went to the spool");

    $p->mode('pass');
    my $t0 = time;
    ok($t->wait_until(sub { all_written(\@mine) }, timeout => 10,
        interval => 0.1), "$label cleared: the events are written");
    diag(sprintf '%s cleared: written %.2f s after', $label, time - $t0);
}

###########################################################################
# nginx -s reload during a fault: the old worker leaves within timeout=
# (and a margin), the spool is kept, its events and those of the new
# worker are written once the fault clears

for my $f ([ 'blackhole' ], [ 'truncate', 'stall' ], [ 'delay', 500 ]) {
    my $label = "reload during @$f";
    $p->mode(@$f);
    my @mine;
    my $send = sub {
        for (1 .. 4) {
            my $j = mint_journey_id($KEY);
            my $r = $t->request('/e', headers => [ 'X-Journey-ID' => $j ],
                timeout => 5);
            push @mine, $j if $r->status == 200;
            $fault_of{$j} = $label;
        }
    };
    $send->();
    my @old = $t->worker_pids;
    ok($t->reload, "$label: reloaded");
    my $t0 = time;
    ok($t->wait_until(sub { !grep { kill 0, $_ } @old }, timeout => 3,
        interval => 0.05), sprintf('%s: the old worker left (%.2f s)',
        $label, time - $t0));
    $send->();
    is(scalar @mine, 8, "$label: 8 requests answered 200");
    push @sent, @mine;
    $p->mode('pass');
    ok($t->wait_until(sub { all_written(\@mine) }, timeout => 10,
        interval => 0.1), "$label cleared: every event written");
}

###########################################################################
# a fault while the spool is written back: 600 events (batches of up to
# 256; more than the 1024 commands a connection takes in flight) logged
# during a blackhole, written back through a slow link (50 ms each way); once some
# batches are acknowledged, replies are cut in the middle (truncate close)
# for a while.  Still every event, in order.

{
    my $label = $WB;
    $p->mode('blackhole');
    my @mine;
    for (1 .. 600) {
        my $j = mint_journey_id($KEY);
        my $r = $t->request('/e', headers => [ 'X-Journey-ID' => $j ],
            timeout => 5);
        push @mine, $j if $r->status == 200;
        $fault_of{$j} = $label;
    }
    is(scalar @mine, 600, "$label: 600 requests answered 200");
    push @sent, @mine;
    my $written = events_total('written');
    $p->mode('delay', 50);
    my $started = $t->wait_until(sub {
        events_total('written') > $written }, timeout => 5, interval => 0.02);
    $p->mode('truncate', 'close');
    my $partly = events_total('written') - $written;
    ok($started, "$label: the write-back began ($partly written when cut)");
    sleep 0.5;
    $p->mode('pass');
    ok($t->wait_until(sub { all_written(\@mine) }, timeout => 10,
        interval => 0.1), "$label cleared: every event written");
}

is(events_total('dropped'), 0, 'no event dropped');

my $g = $t->redis_stream('cg:events');
my (%eids, @first, %seen);
for my $e (@$g) {
    my $j = $e->{f}{journey} // '';
    $eids{$j}{ $e->{f}{eid} // '' }++;
    push @first, $j unless $seen{$j}++;
}
my @missing = grep { !$eids{$_} } @sent;
is_deeply(\@missing, [], 'cg:events: every accepted event at least once')
    or diag join "\n", map { "$_ ($fault_of{$_})" } @missing;
my @two = grep { keys %{ $eids{$_} } != 1 } @sent;
is_deeply(\@two, [], 'one eid per request (a rewrite repeats the eid)');
my @dups = grep { (values %{ $eids{$_} })[0] > 1 } grep { $eids{$_} } @sent;
diag(sprintf '%d of %d events written more than once (allowed)',
    scalar @dups, scalar @sent);
# the order, apart from the 600 events of the write-back section
my @few = grep { $fault_of{$_} ne $WB } @sent;
is_deeply([ grep { $fault_of{$_} ne $WB } @first ], \@few,
    'cg:events: in the order of the requests')
    or diag_order([ grep { $fault_of{$_} ne $WB } @first ], \@few,
        \%fault_of);
my @many = grep { $fault_of{$_} eq $WB } @sent;
is_deeply([ grep { $fault_of{$_} eq $WB } @first ], \@many,
    'cg:events: 600 events logged during a blackhole, in the order of the '
    . 'requests')
    or diag_order([ grep { $fault_of{$_} eq $WB } @first ], \@many,
        \%fault_of);

my @no_own = grep {
    !@{ $t->journey_timeline($_) }
} @sent;
is_deeply(\@no_own, [], "every journey's own timeline has its event");

my $rd = $t->redis_query('XREADGROUP', 'GROUP', 'agency', 'c1', 'COUNT',
    10000, 'STREAMS', 'cg:events', '>');
my %got = map { my %f = @{ $_->[1] }; ($f{journey} // '') => 1 }
    @{ ref $rd eq 'ARRAY' ? $rd->[0][1] : [] };
is_deeply([ grep { !$got{$_} } @sent ], [],
    'the consumer group delivers every event');

$p->stop;
$t->done_testing;
