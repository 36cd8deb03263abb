#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The event spool under valgrind's memcheck: events spooled while Redis is
# down and drained in batches when it is back; then, Redis paused, events
# sent directly and, past the per-worker window, claimed from the spool,
# all still in flight when nginx quits.  No invalid access, uninitialised
# use or leak of the module's own may show.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $VALGRIND = '/usr/bin/valgrind';
plan skip_all => 'valgrind not installed' unless -x $VALGRIND;
# valgrind cannot run a binary built with AddressSanitizer
plan skip_all => 'nginx built with sanitizers' if $ENV{CIVICGATE_SANITIZER};

my $t = Civicgate::Test->new;
$t->write_secret_file('keys', [ [ k1 => random_key_hex(32) ] ]);

$t->write_nginx_conf(<<'EOF', master_process => 'off');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=20s;
    civicgate_event_drain_inflight 300;

    server {
        listen 127.0.0.1:%%PORT_0%%;

        civicgate_journey on;

        location /ev {
            civicgate_service vg;
            return 200 "ok\n";
        }
        location = /metrics {
            civicgate_events off;
            civicgate_metrics;
        }
    }
EOF

sub events_metric {
    return metric($t->metrics(timeout => 30), 'civicgate_events_total',
        result => $_[0]) // 0;
}

sub hit {
    my ($n) = @_;
    my $bad = 0;
    for (1 .. $n) {
        my $r = $t->request('/ev', timeout => 30);
        $bad++ unless $r->status == 200;
    }
    return $bad;
}

# Redis down at the start
$t->run(timeout => 60, wrapper => [ $VALGRIND, '--error-exitcode=0',
    '--leak-check=full', '--show-leak-kinds=definite', '--num-callers=30',
    '--log-file=' . $t->testdir . '/valgrind.log' ]);

is(hit(400), 0, '400 requests while Redis is down');
is(events_metric('spooled'), 400, '400 events spooled');

$t->run_redis;
ok($t->wait_until(sub {
    ($t->redis_query('XLEN', 'cg:events') // 0) >= 400
}, timeout => 60, interval => 0.2), 'Redis back: the spool is drained');

# Redis answers nothing for a while: past 1 024 commands in flight, events
# are spooled and claimed, and all of it is in flight at the exit
# (how many batches 600 events make depends on the machine's pace: more
# requests until the window is full, 3 000 at most)
$t->redis_query('CLIENT', 'PAUSE', 60000, 'ALL');
my ($sent, $failed) = (0, 0);
while ($sent < 3000) {
    $failed += hit(300);
    $sent += 300;
    last if $sent >= 600
        && $t->wait_until(sub { events_metric('spooled') > 400 },
                          timeout => 1);
}
is($failed, 0, "$sent requests while Redis is paused");
ok(events_metric('spooled') > 400, 'some went to the spool');

my $mark = $t->log_mark;
$t->stop;
like($t->log_since($mark), qr/\[warn\].*civicgate: nginx exiting, \d+ journey events in the spool discarded/,
    'the events in flight at exit are counted as discarded');

my $log = $t->read_file('valgrind.log') // '';
like($log, qr/Memcheck.*HEAP SUMMARY/s, 'ran under memcheck to a clean exit');
unlike($log, qr/Invalid (read|write|free)|uninitialised|Mismatched free|
    overlap/x, 'no invalid memory access');

# nginx itself keeps some allocations to exit; none may be the module's
my @leaks = grep { /civicgate/ } split /\n(?===\d+== \S)/, $log;
is(scalar(grep { /definitely lost/ } @leaks), 0,
    'nothing of the module\'s definitely lost') or diag join "\n", @leaks;

$t->done_testing;
