#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# `make demo` as the README has it: it starts, prints the walkthrough and
# answers; Ctrl-C (SIGINT to the whole foreground process group, as a
# terminal sends it) stops every process it started, removes its
# directory, and make reports no error ("Error 130").  Its status lists
# the public services only.

use strict;
use warnings;

use FindBin;
use JSON::PP;
use lib "$FindBin::Bin/lib";
use POSIX qw(:sys_wait_h);
use Test::More;
use Time::HiRes qw(sleep time);
use Civicgate::Test qw(:all);

# the demo builds and runs the ordinary module; the sanitizer suite has
# no demo of its own
plan skip_all => 'nginx built with sanitizers' if $ENV{CIVICGATE_SANITIZER};

for my $cmd (qw(redis-server redis-cli curl openssl make)) {
    plan skip_all => "$cmd not found (make demo installs it as root)"
        unless grep { -x "$_/$cmd" } split /:/, $ENV{PATH} // '';
}

my $t = Civicgate::Test->new(redis => 0);
my $top = "$FindBin::Bin/..";
my $port = $t->port('demo');
my $log = $t->testdir . '/demo.out';

my $pid = fork // die "fork: $!";
if ($pid == 0) {
    POSIX::setsid();
    # as at a terminal, even when the tests run as a background job (which
    # ignores SIGINT, and so would everything it starts)
    $SIG{INT} = $SIG{QUIT} = 'DEFAULT';
    open STDIN, '<', '/dev/null';
    open STDOUT, '>', $log or POSIX::_exit(126);
    open STDERR, '>&', \*STDOUT or POSIX::_exit(126);
    $ENV{CIVICGATE_DEMO_PORT} = $port;
    delete $ENV{MAKEFLAGS};
    { exec 'make', '-C', $top, 'demo'; }
    POSIX::_exit(127);
}

# the process group is the demo's: ends whatever is left of it
my $exited;
END { kill 'KILL', -$pid if $pid && !$exited; }

my $started = $t->wait_until(sub {
    return 1 if ($t->read_file($log) // '') =~ /^Press Ctrl-C to stop\.$/m;
    return -1 if waitpid($pid, WNOHANG) == $pid;
    return 0;
}, timeout => 300, interval => 0.2);
my $out = $t->read_file($log) // '';
is($started, 1, 'make demo prints the walkthrough') or diag($out);
my ($dir) = $out =~ /^\s+files\s+(\S+)$/m;
ok(defined $dir && -d $dir, 'the demo names its directory');

my $r = $t->request('/healthz', port => $port);
is($r->status, 200, 'the gateway answers');

# the status lists the public services only: no consent API, no admin
$r = $t->request('/status/', port => $port);
my $status = eval { JSON::PP->new->decode($r->body) } // {};
is_deeply([ map { $_->{name} } @{ $status->{services} // [] } ],
    [ qw(health-records permits) ], 'GET /status/: the public services');

# Ctrl-C
kill 'INT', -$pid;
my $done = $t->wait_until(sub { waitpid($pid, WNOHANG) == $pid },
    timeout => 30, interval => 0.1);
$status = $?;
$exited = $done;
ok($done, 'make demo ends within 30 s of Ctrl-C');
$out = $t->read_file($log) // '';

# make itself dies of the SIGINT, as it does from a terminal; it must not
# have seen the demo fail
ok(WIFEXITED($status) && WEXITSTATUS($status) == 0
    || WIFSIGNALED($status) && WTERMSIG($status) == POSIX::SIGINT,
    'make ends by Ctrl-C, not by an error') or diag("status $status");
unlike($out, qr/^make(?:\[\d+\])?: \*\*\*.*$/m, 'make reports no error')
    or diag($out =~ /^(make.*\*\*\*.*)$/m);
like($out, qr/^demo: stopped$/m, 'the demo says it stopped');
unlike($out, qr/exited unexpectedly/, 'no process seen exiting on its own');
ok(!kill(0, -$pid), 'no process of the demo is left');
ok(!$t->wait_port($port, 0.2), "nothing listens on port $port");
ok(defined $dir && !-e $dir, 'its directory is removed');

$t->done_testing;
