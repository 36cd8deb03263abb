#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# A stalled Redis peer (accepts, reads, never answers): the per-command
# timeout closes the connection ("timed out"), reconnects with backoff,
# the events are spooled and the responses are never delayed.  Pointed at
# a real Redis by a reload, the spool is written.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Select;
use IO::Socket::INET;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $JRE = journey_id_re();

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

my $STALL = $t->port('stall');
my $ACCEPTS = $t->topdir . '/stall-accepts.log';

# the stalled peer: accepts every connection, reads and discards, never
# writes; logs one line per accepted connection
my $dpid = $t->run_stalled_peer($STALL, $ACCEPTS);
ok($t->wait_port($STALL), 'stalled peer listening');
# wait_port connected once: that is not the gateway
sleep 0.1;
truncate $ACCEPTS, 0;

my $CONF = <<'EOF';
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%PORT_@PEER@%% timeout=100ms;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        location /e {
            civicgate_journey on;
            civicgate_channel web;
            civicgate_service stall;
            return 200 "ok\n";
        }
        location = /metrics {
            civicgate_metrics;
        }
    }
EOF

sub write_conf {
    my ($peer) = @_;
    (my $c = $CONF) =~ s/\@PEER\@/$peer/;
    $t->write_nginx_conf($c);
}

my $URL = "redis://127.0.0.1:$STALL";
write_conf('stall');
my $mark = $t->log_mark;
my $t_start = time;
$t->run;

###########################################################################
# requests while the peer stalls

sub accepts {
    open my $fh, '<', $ACCEPTS or return ();
    my @a = map { $_ + 0 } <$fh>;
    return @a;
}

my (@late, $bad, %sent);
my $max = 0;

sub one_request {
    my ($i) = @_;
    my $t0 = time;
    my $r = $t->request('/e', timeout => 5);
    my $el = time - $t0;
    $max = $el if $el > $max;
    push @late, sprintf('%d: %.3fs', $i, $el) if $el >= 1;
    $bad++ unless $r->status == 200;
    $sent{ $r->header('X-Journey-ID') // '' } = 1;
}

{
    # the first command the peer never answers: closed after timeout=100ms
    one_request(0);
    my $seen = $t->wait_for_log(qr/civicgate: redis \Q$URL\E timed out/,
        since => $mark, timeout => 3);
    my $t_seen = time;
    my ($first) = accepts();
    ok($seen, 'error log: civicgate: redis URL timed out');
    ok(defined $first && $t_seen - $first < 0.6, sprintf(
        'the unanswered connection is closed after about timeout=100ms '
        . '(timed out %.3f s after the peer accepted)',
        $t_seen - ($first // 0)));
}

my $N = 30;
for my $i (1 .. $N - 1) {
    one_request($i);
    sleep 0.1;
}
ok(!$bad, "$N requests answered 200 while the peer stalls");
is_deeply(\@late, [], sprintf('each answered in < 1 s (max %.3f s)', $max));

ok($t->wait_until(sub {
    (metric($t->metrics, 'civicgate_events_total', result => 'spooled')
        // 0) > 0 }, timeout => 3),
    'events_total{result="spooled"} > 0');
my $m = $t->metrics;
is(metric($m, 'civicgate_events_total', result => 'written'), 0,
    'nothing written');
is(metric($m, 'civicgate_events_total', result => 'dropped'), 0,
    'nothing dropped');

{
    # reconnection with backoff (a random delay between 10 ms and a
    # ceiling doubling from 100 ms to 2 s), after a 100 ms timeout each
    # time: a bounded number of connections, not one per request.  The
    # bound counts each delay as a quarter of its mean, which the random
    # delays of a run do not all undercut.
    my $elapsed = time - $t_start;
    my @acc = accepts();
    my ($bound, $tt, $c) = (1, 0, 0.1);
    while ($tt <= $elapsed) {
        $tt += 0.1 + (0.01 + $c) / 8;
        $c = $c * 2 > 2 ? 2 : $c * 2;
        $bound++;
    }
    $bound += 2;
    cmp_ok(scalar @acc, '>=', 2, 'the gateway reconnected to the stalled peer');
    cmp_ok(scalar @acc, '<=', $bound, sprintf('reconnects with backoff: '
        . '%d connections in %.1f s (at most %d)', scalar @acc, $elapsed,
        $bound));

    my $log = $t->log_since($mark);
    my @err = grep { /\[error\].*civicgate: redis/ } split /\n/, $log;
    is(scalar @err, 1, 'repeated errors: one at [error]')
        or diag join "\n", @err;
    like($log, qr/\[info\].*civicgate: redis \Q$URL\E/,
        'repeated errors: the others at [info]');
}

###########################################################################
# reload pointing at a real Redis: the spool is written

$t->run_redis;
write_conf('redis');
$mark = $t->log_mark;
ok($t->reload, 'reload with civicgate_redis pointing at Redis');

my %got;
my $ok = $t->wait_until(sub {
    %got = ();
    for my $e (@{ $t->redis_stream('cg:events') }) {
        $got{ $e->{f}{journey} }{ $e->{f}{eid} } = 1;
    }
    keys %got >= $N;
}, timeout => 10, interval => 0.25);
ok($ok, 'after the reload the spooled events are written');
is(scalar(grep { $got{$_} } keys %sent), $N,
    "an event for each of the $N requests");
is(scalar(grep { keys %{ $got{$_} } != 1 } keys %got), 0,
    'one eid per journey');
$m = $t->metrics;
cmp_ok(metric($m, 'civicgate_events_total', result => 'written'), '>=', $N,
    'events_total{result=written} counts them (counters survive the reload)');

###########################################################################
# a real Redis that stalls (SIGSTOP) once the connection is in use

{
    my $rurl = 'redis://127.0.0.1:' . $t->redis_port;
    my $before = $t->redis_query('XLEN', 'cg:events');
    my $written = metric($t->metrics, 'civicgate_events_total',
        result => 'written');
    my $mark = $t->log_mark;
    kill 'STOP', $t->redis_pid;
    my $t0 = time;
    my (%sent2, @late2, $bad2);
    my $max2 = 0;
    my $first = $t->request('/e', timeout => 5);
    $sent2{ $first->header('X-Journey-ID') // '' } = 1;
    my $seen = $t->wait_for_log(qr/civicgate: redis \Q$rurl\E timed out/,
        since => $mark, timeout => 3);
    my $took = time - $t0;
    ok($seen, 'Redis stopped: timed out logged');
    cmp_ok($took, '<', 0.6, sprintf('Redis stopped: the connection is closed '
        . 'after about timeout=100ms (%.3f s)', $took));
    for my $i (1 .. 19) {
        my $s0 = time;
        my $r = $t->request('/e', timeout => 5);
        my $el = time - $s0;
        $max2 = $el if $el > $max2;
        push @late2, sprintf('%d: %.3fs', $i, $el) if $el >= 1;
        $bad2++ unless $r->status == 200;
        $sent2{ $r->header('X-Journey-ID') // '' } = 1;
        sleep 0.02;
    }
    ok(!$bad2, 'Redis stopped: 20 requests answered 200');
    is_deeply(\@late2, [], sprintf('Redis stopped: each answered in < 1 s '
        . '(max %.3f s)', $max2));
    kill 'CONT', $t->redis_pid;

    my %got2;
    my $ok2 = $t->wait_until(sub {
        %got2 = map { $_->{f}{journey} => 1 }
            @{ $t->redis_stream('cg:events') };
        !grep { !$got2{$_} } keys %sent2;
    }, timeout => 8, interval => 0.25);
    ok($ok2, 'Redis continued: the 20 events are written');
}

$t->stop;
$t->stop_daemon($dpid);
$t->done_testing;
