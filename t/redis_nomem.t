#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# No memory for the Redis output buffer.  After a burst makes the buffer
# grow past 64 KB, it is given back for a 16 KB one once written; if that
# allocation fails, the worker must go on (it used to keep a size of 0 and
# loop for ever at the next command).
#
# The failure is real: a preloaded malloc() fails every 16384-byte
# allocation while a trigger file exists.  The burst comes at once: the
# worker is stopped while the requests queue, so that it reads them all in
# one event loop iteration and their commands go out in one write.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use IO::Socket::INET;
use IO::Select;
use Civicgate::Test qw(:all);

my $N = 400;

my $CC = (grep { -x } map { "$_/cc" } split /:/, $ENV{PATH} // '')[0];
plan skip_all => 'no C compiler for the malloc() shim' unless $CC;
# the sanitizers' allocator replaces malloc(): the shim cannot stand in
plan skip_all => 'nginx built with sanitizers' if $ENV{CIVICGATE_SANITIZER};

my $t = Civicgate::Test->new;
my $dir = $t->testdir;
my $TRIGGER = "$dir/fail-16k";

$t->write_file('shim.c', <<'EOF');
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern void *__libc_malloc(size_t size);

static char trigger[4096];

/* nginx empties the environment of its workers: read it at load time */
__attribute__((constructor)) static void
shim_init(void)
{
    const char  *p = getenv("CIVICGATE_TEST_FAIL_16K");

    if (p != NULL && strlen(p) < sizeof(trigger)) {
        strcpy(trigger, p);
    }
}

void *
malloc(size_t size)
{
    if (size == 16384 && trigger[0] && access(trigger, F_OK) == 0) {
        return NULL;
    }

    return __libc_malloc(size);
}
EOF

system($CC, '-shared', '-fPIC', '-O2', '-o', "$dir/shim.so", "$dir/shim.c") == 0
    or plan skip_all => 'cannot build the malloc() shim';

$t->write_secret_file('keys', [ [ k1 => random_key_hex(32) ] ]);

# eight Redis limits with long names: about 1 KB of EVALSHA per request
my @ZONES = map { sprintf 'zone%d-%s', $_, 'x' x 40 } 1 .. 8;
my $ZONES = join '', map {
    "    civicgate_limit_zone \$binary_remote_addr zone=$_:1m "
    . "rate=100000r/s store=redis;\n"
} @ZONES;
my $LIMITS = join '', map {
    "            civicgate_limit zone=$_ burst=100000 nodelay;\n"
} @ZONES;

my %EVENTS = (events => '    multi_accept on;', worker_connections => 2048);
$t->write_nginx_conf(<<"EOF", %EVENTS);
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=2s;
$ZONES
    server {
        listen 127.0.0.1:%%PORT_0%% backlog=1024;
        server_name localhost;

        civicgate_journey off;

        # a static file: "return" would answer before the limits
        location = /a {
$LIMITS
            root %%TESTDIR%%/www;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }
EOF

$t->write_file('www/a', "ok\n");
$t->allow_log(qr/malloc\(16384\) failed/);
$t->run_redis;
{
    local $ENV{LD_PRELOAD} = "$dir/shim.so";
    local $ENV{CIVICGATE_TEST_FAIL_16K} = $TRIGGER;
    $t->run;
}

sub commands {
    my $m = $t->metrics or return 0;
    return metric($m, 'civicgate_redis_commands_total') // 0;
}

is($t->request('/a')->status, 200, 'a first request');

my ($worker) = $t->worker_pids;
my $mark = $t->log_mark;

# the requests wait in the socket buffers while the worker is stopped
kill 'STOP', $worker;
my @socks;
for (1 .. $N) {
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $t->port(0), Proto => 'tcp', Timeout => 5) or last;
    syswrite($s, "GET /a HTTP/1.0\r\nHost: localhost\r\n\r\n");
    push @socks, $s;
}
is(scalar @socks, $N, "$N requests queued");

open my $fh, '>', $TRIGGER or die "$TRIGGER: $!";
close $fh;
kill 'CONT', $worker;

my $sel = IO::Select->new(@socks);
my %buf;
my $end = time + 15;
while ($sel->count && time < $end) {
    for my $s ($sel->can_read(0.5)) {
        my $n = sysread($s, $buf{ fileno $s }, 4096, length($buf{ fileno $s } // ''));
        $sel->remove($s) unless $n;
    }
}
unlink $TRIGGER;

my $ok = grep { /^HTTP\/1\.\d 200/ } values %buf;
is($ok, $N, "the $N requests were answered");

like($t->log_since($mark), qr/malloc\(16384\) failed/,
    'the 16 KB allocation did fail (the path was taken)');

# a worker looping for ever would answer nothing more
# past the reconnect that used to start the loop
sleep 0.5;
my $c0 = commands();
my $r = $t->request('/a', timeout => 5);
is($r->status, 200, 'the worker still answers');
cmp_ok(commands(), '>', $c0, 'and still sends commands to Redis');

close $_ for @socks;
$t->done_testing;
