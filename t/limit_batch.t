#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Exact store=redis limits of concurrent requests: a worker sends the
# checks of the requests of one event-loop iteration in one script call,
# with the same decisions as one call per request:
#
# - 20 requests reaching the worker at once (sent on open connections
#   while it is stopped) on one key: exactly burst + 1 admitted, in one
#   script call (INFO commandstats), with one TIME;
# - 20 requests at once on 10 keys: one admitted per key;
# - two limits per request, at once: the stricter decides, and rejected
#   requests charge neither (all or none, within a batch too);
# - requests whose clients leave while Redis is stopped (SIGSTOP) leave
#   the batch; the worker survives and decides again when Redis resumes;
# - requests whose clients leave while their batch is out and Redis then
#   answers it (CLIENT PAUSE, shorter than the timeout): the answer skips
#   them without touching what they freed (make test-asan checks it), the
#   others of the batch get theirs.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use IO::Socket::INET;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $RUN = sprintf '%x', int(rand(2**31));

$t->write_file('file.txt', "static\n");
$t->write_nginx_conf(<<'EOF', worker_processes => 1);
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=1s;

    civicgate_limit_zone $http_x_key zone=one:1m rate=1r/m store=redis;
    civicgate_limit_zone $http_x_key zone=ra:1m rate=1r/m store=redis;
    civicgate_limit_zone $http_x_key zone=rb:1m rate=1r/m store=redis;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        location = /one {
            civicgate_limit zone=one burst=4 nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /two {
            civicgate_limit zone=ra burst=5 nodelay;
            civicgate_limit zone=rb burst=1 nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /ping {
            return 204;
        }
        location = /ra {
            civicgate_limit zone=ra burst=5 nodelay;
            alias %%TESTDIR%%/file.txt;
        }
    }
EOF

$t->allow_log(qr/redis|Redis/);
$t->run_redis;
$t->run;

my $PORT = $t->port(0);

sub raw {
    my ($path, $key) = @_;
    return "GET $path HTTP/1.1\r\nHost: localhost\r\nX-Key: $key\r\n"
        . "Connection: close\r\n\r\n";
}

# the requests reach the worker in one event-loop iteration: sent on
# connections already open while the worker is stopped (SIGSTOP)
sub at_once {
    my (@reqs) = @_;
    my @socks;
    for my $i (0 .. $#reqs) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $PORT, Proto => 'tcp') or die "connect: $!";
        print $s "GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n";
        my $head = '';
        while ($head !~ /\r\n\r\n/) {
            sysread($s, $head, 4096, length $head) or last;
        }
        push @socks, $s;
    }
    my ($worker) = $t->worker_pids;
    kill 'STOP', $worker;
    print { $socks[$_] } $reqs[$_] for 0 .. $#reqs;
    sleep 0.2;
    kill 'CONT', $worker;
    my @st;
    for my $s (@socks) {
        local $/;
        my $raw = <$s>;
        push @st, defined $raw ? parse_response($raw)->status : 0;
        close $s;
    }
    return @st;
}

sub calls {
    my ($cmd) = @_;
    my $info = $t->redis_query('INFO', 'commandstats') // '';
    return $info =~ /^cmdstat_\Q$cmd\E:calls=(\d+)/m ? $1 : 0;
}

# connected, script loaded
is(parse_response(http_get('/one', port => $PORT,
    headers => [ 'X-Key' => "warm-$RUN" ]))->status, 200, 'warm-up');

{
    $t->redis_query('CONFIG', 'RESETSTAT');
    my @s = at_once(map { raw('/one', "same-$RUN") } 1 .. 20);
    my ($evalsha, $time) = (calls('evalsha'), calls('time'));
    is(scalar(grep { $_ == 200 } @s), 5, '20 at once, one key: burst + 1 '
        . 'admitted') or diag "@s";
    is(scalar(grep { $_ == 429 } @s), 15, '... the others rejected');
    diag("20 requests at once: $evalsha script calls");
    ok($evalsha >= 1 && $evalsha <= 2,
        "$evalsha script call(s) for 20 requests of one iteration");
    is($time, $evalsha, 'one TIME per script call');
}

{
    my @s = at_once(map { raw('/one', "k$_-$RUN") } (1 .. 10, 1 .. 10));
    is(scalar(grep { $_ == 200 } @s), 20, '20 at once on 10 new keys: all '
        . 'within their bursts') or diag "@s";
    my @s2 = at_once(map { raw('/one', "k$_-$RUN") } 1 .. 10);
    my @s3 = at_once(map { raw('/one', "k$_-$RUN") } (1 .. 10) x 3);
    is(scalar(grep { $_ == 200 } @s2, @s3), 30, '... then 40 more: each key '
        . 'admits exactly its remaining three') or diag "@s2 @s3";
}

{
    my $k = "two-$RUN";
    my @s = at_once(map { raw('/two', $k) } 1 .. 6);
    is(scalar(grep { $_ == 200 } @s), 2, 'two limits, 6 at once: the '
        . 'stricter (burst 1) admits 2') or diag "@s";
    my @s2 = at_once(map { raw('/ra', $k) } 1 .. 6);
    is(scalar(grep { $_ == 200 } @s2), 4, 'the rejected requests charged '
        . 'the other limit nothing (4 of its 6 left)') or diag "@s2";
}

{
    my $pid = $t->redis_pid;
    kill 'STOP', $pid;
    my @socks;
    for my $i (1 .. 6) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $PORT, Proto => 'tcp') or next;
        print $s raw('/one', "gone-$RUN-$i");
        push @socks, $s;
    }
    sleep 0.3;
    close $_ for @socks;
    sleep 0.2;
    kill 'CONT', $pid;
    my $st;
    ok($t->wait_until(sub {
            $st = parse_response(http_get('/one', port => $PORT,
                headers => [ 'X-Key' => "after-$RUN" ]))->status;
            $st == 200 }, timeout => 10),
        'clients gone while waiting: the worker decides again afterwards');
    ok(kill(0, $t->worker_pids), 'the worker is alive');
}

{
    # the batch goes out, Redis holds it; some clients leave meanwhile
    $t->redis_query('CLIENT', 'PAUSE', 600, 'ALL');
    my (@gone, @stay);
    for my $i (1 .. 8) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $PORT, Proto => 'tcp') or next;
        print $s raw('/one', "paused-$RUN-$i");
        push @{ $i % 2 ? \@gone : \@stay }, $s;
    }
    sleep 0.3;
    close $_ for @gone;
    my @st;
    for my $s (@stay) {
        local $/;
        my $raw = <$s>;
        push @st, defined $raw ? parse_response($raw)->status : 0;
        close $s;
    }
    is_deeply(\@st, [ (200) x @stay ],
        'a batch answered after some of its clients left: the others pass')
        or diag "@st";
    ok(kill(0, $t->worker_pids), 'the worker is alive');
    is(parse_response(http_get('/one', port => $PORT,
        headers => [ 'X-Key' => "paused-after-$RUN" ]))->status, 200,
        'and decides the next request');
}

$t->done_testing;
