#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# A. A worker killed while it holds the event spool's lock: the master
#    releases the lock, the replacement worker keeps answering and
#    spooling, and the spool is intact (every event reaches Redis when it
#    is back).
# B. A worker killed after it claimed spooled events for Redis, before
#    sending them: once the claim's deadline has passed, the replacement
#    worker writes them, each event once.
# The kills happen at chosen places through gdb; the test is skipped when
# gdb is missing or cannot attach.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use POSIX qw(WNOHANG);
use Civicgate::Test qw(:all);

my $GDB = Civicgate::Test::_which('gdb');
plan(skip_all => 'gdb not found') unless $GDB;

my $t = Civicgate::Test->new;

$t->write_secret_file('keys', [ [ k1 => random_key_hex(32) ] ]);

$t->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=200ms;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_journey on;

        location /ev {
            civicgate_service lock;
            return 200 "ok\n";
        }
        location = /metrics {
            civicgate_events off;
            civicgate_metrics;
        }
    }
EOF

# Redis is down from the start: every event goes to the spool
$t->run;

$t->allow_log(qr/exited on signal 9/);
$t->allow_log(qr/shared memory zone "civicgate_events" was locked by/);

my $r = $t->request('/ev');
is($r->status, 200, 'first request answered, its event spooled');

my ($worker) = $t->worker_pids;
ok($worker, "worker $worker");

# stop the worker in the spool's critical section: inside the append, at
# the unlock call, with the lock held; then kill it there
my $out = $t->testdir . '/gdb.out';
my $gdb = Civicgate::Test::_spawn($out, $GDB, '-nx', '-batch',
    '-p', $worker,
    '-ex', 'break ngx_http_civicgate_spool_append',
    '-ex', 'continue',
    '-ex', 'tbreak ngx_shmtx_unlock',
    '-ex', 'continue',
    '-ex', 'kill');

my $attached = $t->wait_until(sub {
    my $o = $t->read_file('gdb.out') // '';
    return 'no' if $o =~ /ptrace|Operation not permitted|Could not attach/i;
    return 'yes' if $o =~ /Breakpoint 1 at/;
    return undef;
}, timeout => 30, interval => 0.1) // 'no';

if ($attached ne 'yes') {
    kill 'KILL', $gdb;
    waitpid $gdb, 0;
    $t->stop;
    diag($t->read_file('gdb.out') // '');
    plan(skip_all => 'gdb cannot attach to the worker');
}

# the request that makes the worker append: answered or not, it dies
my $req = Civicgate::Test::_spawn(undef, sub {
    Civicgate::Test::http_get('/ev', port => $t->port(0), timeout => 3,
        quiet => 1);
});

my $end = time + 30;
my $gdb_done;
while (time < $end) {
    if (waitpid($gdb, WNOHANG) == $gdb) { $gdb_done = 1; last }
    sleep 0.1;
}
unless ($gdb_done) {
    kill 'KILL', $gdb;
    waitpid $gdb, 0;
}
waitpid $req, 0;
ok($gdb_done, 'gdb stopped the worker in the spool append and killed it')
    or diag($t->read_file('gdb.out') // '');
like($t->read_file('gdb.out') // '', qr/breakpoint 2, .*ngx_shmtx_unlock/i,
    'killed at the spool unlock, the lock held');

ok($t->wait_until(sub { !kill 0, $worker }, timeout => 5),
    'the worker is gone');
my $new = $t->wait_until(sub {
    my @w = grep { $_ != $worker } $t->worker_pids;
    @w ? $w[0] : undef;
}, timeout => 10);
ok($new, 'the master started a replacement worker');

# before the fix: the first request is answered, its log phase then spins
# on the dead worker's lock, and every later request waits for ever
my $bad = 0;
for my $i (1 .. 4) {
    my $r = $t->request('/ev', timeout => 3, quiet => 1);
    $bad++ unless $r->status == 200;
}
is($bad, 0, 'the replacement worker answers every request');
ok($t->wait_for_log(qr/shared memory zone "civicgate_events" was locked by/,
    timeout => 1), 'the master released the dead worker\'s spool lock');

# 1 + the one spooled as the worker died + 4: all in the spool, in order
$t->run_redis;
ok($t->wait_until(sub { ($t->redis_query('XLEN', 'cg:events') // 0) >= 6 },
    timeout => 10), 'Redis back: the spooled events are written')
    or diag 'XLEN ' . ($t->redis_query('XLEN', 'cg:events') // 'undef');
is($t->redis_query('XLEN', 'cg:events'), 6, 'exactly 6 events');

# B. killed holding a claim
{
    $t->stop_redis;
    my $N = 300;
    my $bad = 0;
    for (1 .. $N) {
        $bad++ unless $t->request('/ev', timeout => 3)->status == 200;
    }
    is($bad, 0, "$N requests spooled while Redis is down");

    my ($w) = $t->worker_pids;
    unlink $out;
    my $gdb = Civicgate::Test::_spawn($out, $GDB, '-nx', '-batch', '-p', $w,
        '-ex', 'break ngx_http_civicgate_spool_send',
        '-ex', 'continue',
        '-ex', 'kill');
    ok($t->wait_until(sub {
        ($t->read_file('gdb.out') // '') =~ /Breakpoint 1 at/
    }, timeout => 30, interval => 0.1), 'gdb attached');

    my $t0 = time;
    $t->run_redis;
    my $end = time + 30;
    my $gdb_done;
    while (time < $end) {
        if (waitpid($gdb, WNOHANG) == $gdb) { $gdb_done = 1; last }
        sleep 0.1;
    }
    unless ($gdb_done) {
        kill 'KILL', $gdb;
        waitpid $gdb, 0;
    }
    like($t->read_file('gdb.out') // '',
        qr/Breakpoint 1, .*ngx_http_civicgate_spool_send/,
        'killed with a claim taken, nothing of it sent')
        or diag($t->read_file('gdb.out') // '');

    ok($t->wait_until(sub {
        ($t->redis_query('XLEN', 'cg:events') // 0) >= $N
    }, timeout => 15, interval => 0.1), 'the replacement worker writes'
        . ' the spool, the dead worker\'s claim included');
    diag(sprintf 'B: written %.2f s after Redis was back', time - $t0);
    sleep 0.3;
    is($t->redis_query('XLEN', 'cg:events'), $N,
        'each event once (a new, empty Redis)');
}

$t->done_testing;
