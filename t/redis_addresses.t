#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# A Redis name that resolves to several addresses: every address is tried
# in turn, whatever the order the resolver returns them in.  The test runs
# in a private mount namespace with its own /etc/hosts (and /etc/gai.conf
# for the order), so it does not depend on the machine's files:
#
#   - the name gives ::1 first, Redis listens on 127.0.0.1 only;
#   - the name gives 127.0.0.1 first, Redis listens on ::1 only.
#
# Both work, and the error log names the address that refused.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use IO::Socket::IP;
use Civicgate::Test qw(:all);

my $NAME = 'civicgate-redis.test';

unless ($ENV{CIVICGATE_TEST_PRIVATE_MOUNTS}) {
    plan skip_all => 'a private /etc/hosts needs root (unshare -m)'
        if $> != 0;
    plan skip_all => 'unshare -m not possible here'
        if system('unshare -m true >/dev/null 2>&1') != 0;
    $ENV{CIVICGATE_TEST_PRIVATE_MOUNTS} = 1;
    exec 'unshare', '-m', '--propagation', 'private', $^X, $0, @ARGV;
    die "exec unshare: $!";
}

my $t = Civicgate::Test->new;
my $dir = $t->testdir;

$t->write_secret_file('keys', [ [ k1 => random_key_hex(32) ] ]);

$t->write_file('hosts', "127.0.0.1 localhost\n::1 localhost\n"
    . "127.0.0.1 $NAME\n::1 $NAME\n");
$t->write_file('gai-ipv4-first.conf', "precedence ::ffff:0:0/96 100\n");

sub bind_mount {
    my ($file, $over) = @_;
    system('umount', $over) if mounted($over);
    return system('mount', '--bind', $file, $over) == 0;
}

sub mounted {
    my ($path) = @_;
    open my $fh, '<', '/proc/self/mountinfo' or return 0;
    return scalar grep { (split / /)[4] eq $path } <$fh>;
}

# in a new process: glibc reads gai.conf once per process
sub resolved {
    my @a = map { /^(\S+)\s+STREAM/ ? $1 : () } `getent ahosts $NAME`;
    return @a;
}

bind_mount("$dir/hosts", '/etc/hosts')
    or plan skip_all => 'cannot bind-mount a private /etc/hosts';

# the gateway's events prove the connection; the metrics count them
sub write_conf {
    my ($port) = @_;
    $t->write_nginx_conf(<<"EOF");
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://$NAME:$port timeout=500ms;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_journey on;

        location /a {
            civicgate_service a;
            return 200 "ok\\n";
        }
        location = /metrics {
            civicgate_events off;
            civicgate_metrics;
        }
    }
EOF
}

sub written {
    my $m = $t->metrics or return 0;
    return metric($m, 'civicgate_events_total', result => 'written') // 0;
}

sub check_case {
    my ($what, $wrong, $port) = @_;
    my $mark = $t->log_mark;
    write_conf($port);
    $t->run;

    # the first requests may come while the wrong address is being tried
    ok($t->wait_until(sub {
        $t->request('/a')->status == 200 && written() >= 1;
    }, timeout => 10), "$what: events are written through $NAME");

    my $log = $t->log_since($mark);
    like($log, qr/connect\(\) to \Q$wrong:$port\E failed \(111: Connection refused\)/,
        "$what: the log names the address that refused ($wrong)");
    unlike($log, qr/recv failed|recv\(\) failed/,
        "$what: a refused connect is not logged as a failed recv");

    $t->stop;
}

###########################################################################
# ::1 first, Redis on 127.0.0.1

SKIP: {
    my @a = resolved();
    skip "$NAME does not resolve to ::1 first here (@a)", 3
        unless @a >= 2 && $a[0] eq '::1' && grep { $_ eq '127.0.0.1' } @a;

    $t->run_redis;
    check_case('::1 first', '[::1]', $t->redis_port);
    $t->stop_redis;
}

###########################################################################
# 127.0.0.1 first, Redis on ::1

SKIP: {
    my $ok = -e '/etc/gai.conf'
        && bind_mount("$dir/gai-ipv4-first.conf", '/etc/gai.conf');
    my @a = $ok ? resolved() : ();
    skip "$NAME does not resolve to 127.0.0.1 first here (@a)", 3
        unless @a >= 2 && $a[0] eq '127.0.0.1' && grep { $_ eq '::1' } @a;

    my $port = $t->port('redis6');
    my $pid = $t->run_daemon($Civicgate::Test::REDIS_SERVER,
        '--port', $port, '--bind', '::1', '--save', '', '--appendonly', 'no',
        '--dir', $dir, '--protected-mode', 'no', '--daemonize', 'no',
        '--logfile', "$dir/redis6.log");

    my $up = $t->wait_until(sub {
        my $s = IO::Socket::IP->new(PeerHost => '::1', PeerPort => $port,
            Proto => 'tcp', Timeout => 1) or return 0;
        close $s;
        1;
    }, timeout => 10);
    skip 'redis-server cannot listen on ::1 here', 3 unless $up;

    check_case('127.0.0.1 first', '127.0.0.1', $port);
    $t->stop_daemon($pid);
}

system('umount', '/etc/gai.conf') if mounted('/etc/gai.conf');
system('umount', '/etc/hosts') if mounted('/etc/hosts');

$t->done_testing;
