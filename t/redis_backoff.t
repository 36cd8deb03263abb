#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Reconnection backoff and its logging:
#
#   - a peer that accepts, answers the connection setup and closes at once
#     (a Redis in a crash loop, a proxy in front of a dead Redis): the
#     backoff is not reset by each successful setup, so the attempts
#     thin out and stay at most the cap (2 s) apart; the error log has one
#     [error] line and one [notice] "connected again", the rest at [info];
#   - Redis stopped for a while: a bounded number of reconnection attempts,
#     one [error] line, and the connection is back within the cap once
#     Redis is.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use IO::Socket::INET;
use IO::Select;
use Civicgate::Test qw(:all);

my $CAP = 2.0;          # NGX_HTTP_CIVICGATE_REDIS_BACKOFF_CAP
my $WINDOW = 6;         # seconds observed

my $t = Civicgate::Test->new;
$t->write_secret_file('keys', [ [ k1 => random_key_hex(32) ] ]);

sub conf {
    my ($n, $port) = @_;
    $n->write_nginx_conf(<<"EOF");
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:$port timeout=500ms;

    server {
        listen 127.0.0.1:%%PORT_${\ $n->name}%%;
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

# answers whatever the first read brings (the pipelined setup), then closes
sub flapping_peer {
    my ($port, $accepts) = @_;
    my $l = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
        LocalPort => $port, Listen => 16, ReuseAddr => 1)
        or die "listen $port: $!";
    open my $log, '>>', $accepts or die "$accepts: $!";
    my $old = select $log; $| = 1; select $old;
    my $end = time + 120;
    while (time < $end) {
        my $c = $l->accept or next;
        printf $log "%.3f\n", time;
        my $buf = '';
        my $sel = IO::Select->new($c);
        while ($buf !~ /SETNAME/i || $buf !~ /\r\n\z/) {
            last unless $sel->can_read(2);
            last unless sysread($c, $buf, 65536, length $buf);
        }
        my $out = '';
        while ($buf =~ /\*(\d+)\r\n((?:\$\d+\r\n[^\r\n]*\r\n)*)/g) {
            my ($n, $args) = ($1, $2);
            $out .= $args =~ /EXISTS/i
                ? '*' . ($n - 2) . "\r\n" . (":1\r\n" x ($n - 2))
                : "+OK\r\n";
        }
        syswrite($c, $out);
        close $c;
    }
}

sub accepts {
    my $text = $t->read_file('accepts') // '';
    return grep { length } split /\n/, $text;
}

###########################################################################
# a peer that drops every connection right after the setup

{
    my $port = $t->port('flap');
    $t->run_daemon(sub { flapping_peer($port, $t->testdir . '/accepts') });
    ok($t->wait_port($port, 5), 'flapping peer listening');

    # wait_port's own connection is not the gateway's
    my $skip = () = accepts();

    conf($t, $port);
    my $mark = $t->log_mark;
    $t->run;
    my $start = time;
    sleep $WINDOW;

    my @at = accepts();
    splice @at, 0, $skip;
    my $n = @at;
    my @gaps = map { $at[$_] - $at[$_ - 1] } 1 .. $#at;
    my ($max) = sort { $b <=> $a } @gaps;
    $max //= 0;

    # a backoff reset at each setup reconnects every 50-100 ms (60+ here);
    # growing from 100 ms to 2 s with jitter, about 10
    cmp_ok($n, '>=', 3, "the gateway kept reconnecting ($n in ${WINDOW} s)");
    cmp_ok($n, '<=', 25, "the backoff grew: $n connections in ${WINDOW} s, "
        . 'not one every 100 ms');
    cmp_ok($max, '<=', $CAP + 1, sprintf('the delay is capped: largest gap '
        . '%.2f s (cap %.1f s)', $max, $CAP));

    my $log = $t->log_since($mark);
    my @err = grep { /\[error\].*(?:civicgate: redis|connect\(\))/ }
        split /\n/, $log;
    is(scalar @err, 1, 'one [error] line for the whole episode')
        or diag join "\n", @err[0 .. ($#err > 9 ? 9 : $#err)];
    my @again = grep { /\[notice\].*connected again/ } split /\n/, $log;
    is(scalar @again, 1, 'one [notice] "connected again"')
        or diag join "\n", @again[0 .. ($#again > 9 ? 9 : $#again)];
    like($log, qr/\[info\].*civicgate: redis .*connection closed/,
        'the following drops at [info]');

    $t->stop;
}

###########################################################################
# Redis down for a while, then back

{
    my $d = $t->nginx('down');
    $d->write_secret_file('keys', [ [ k1 => random_key_hex(32) ] ]);
    $t->run_redis;
    conf($d, $t->redis_port);
    $d->run;

    my $m0;
    ok($d->wait_until(sub {
        $m0 = $d->metrics(port => $d->port('down'));
        (metric($m0, 'civicgate_redis_connections', role => 'command') // 0)
            == 1 }, timeout => 10), 'connected');
    my $r0 = metric($m0, 'civicgate_redis_reconnects_total') // 0;

    my $mark = $d->log_mark;
    $t->stop_redis;
    sleep $WINDOW;

    my $m1 = $d->metrics(port => $d->port('down'));
    my $r = (metric($m1, 'civicgate_redis_reconnects_total') // 0) - $r0;
    cmp_ok($r, '>=', 3, "Redis down ${WINDOW} s: still trying ($r attempts)");
    cmp_ok($r, '<=', 25, "Redis down ${WINDOW} s: $r attempts, with backoff");

    $t->run_redis;
    ok($d->wait_for_log(qr/connected again/, since => $mark,
        timeout => $CAP + 2), 'back within the cap once Redis is');

    my $log = $d->log_since($mark);
    my @err = grep { /\[error\].*(?:civicgate: redis|connect\(\))/ }
        split /\n/, $log;
    is(scalar @err, 1, 'one [error] line for the outage')
        or diag join "\n", @err[0 .. ($#err > 9 ? 9 : $#err)];
    my @again = grep { /\[notice\].*connected again/ } split /\n/, $log;
    is(scalar @again, 1, 'one [notice] "connected again"');
}

$t->done_testing;
