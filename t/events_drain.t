#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Draining the event spool after an outage.
#
# A. Behind a link that delays every reply by 100 ms, 3 000 spooled events
#    are written in a few round trips: large pipelined batches, from every
#    worker (each worker's Redis connection carries a share of them).  At
#    64 events per round trip it would take at least 47 round trips.
# B. civicgate_event_drain_inflight is checked by nginx -t.
# C. With wrk installed: a full spool of about 32 000 events drains into a
#    local redis-server, every event once; the rate is reported.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use IO::Select;
use IO::Socket::INET;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;

$t->write_secret_file('keys', [ [ k1 => random_key_hex(32) ] ]);

my $HTTP = <<'EOF';
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS%% timeout=3s;
%%EXTRA%%
    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_journey on;

        location /ev {
            civicgate_service drain;
            return 200 "ok\n";
        }
        location = /metrics {
            civicgate_events off;
            civicgate_metrics;
        }
    }
EOF

sub conf {
    my ($redis, $extra, %g) = @_;
    (my $h = $HTTP) =~ s/%%EXTRA%%/$extra/;
    $h =~ s/%%REDIS%%/%%PORT_${redis}%%/;
    $t->write_nginx_conf($h, %g);
}

sub events_metric {
    my ($result) = @_;
    return metric($t->metrics, 'civicgate_events_total', result => $result)
        // 0;
}

# a TCP relay to Redis that holds every reply for $delay seconds and counts
# the EVALSHA commands each connection carries, in $stats
sub run_slow_link {
    my ($port, $to, $delay, $stats) = @_;
    my $pid = $t->run_daemon(sub {
        my $l = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
            LocalPort => $port, Listen => 16, ReuseAddr => 1)
            or die "listen $port: $!";
        my $sel = IO::Select->new($l);
        my (%peer, %queue, %count, %tailbuf);
        my $end = time + 120;
        while (time < $end) {
            my $wait = 0.01;
            for my $s ($sel->can_read($wait)) {
                if ($s == $l) {
                    my $c = $l->accept or next;
                    my $r = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                        PeerPort => $to) or do { close $c; next };
                    $peer{$c} = $r;
                    $peer{$r} = $c;
                    $queue{$r} = [];
                    $count{$c} = 0;
                    $tailbuf{$c} = '';
                    $sel->add($c, $r);
                    next;
                }
                my $n = sysread($s, my $buf, 65536);
                if (!$n) {
                    my $o = $peer{$s};
                    $sel->remove($s, $o);
                    delete @peer{ $s, $o };
                    delete @queue{ $s, $o };
                    close $s;
                    close $o;
                    next;
                }
                if (exists $count{$s}) {
                    # towards Redis, at once; counted across reads
                    my $text = $tailbuf{$s} . $buf;
                    $count{$s}++ while $text =~ /\r\nEVALSHA\r\n/g;
                    $tailbuf{$s} = substr($text, -12);
                    syswrite($peer{$s}, $buf);
                } else {
                    push @{ $queue{$s} }, [ time + $delay, $buf ];
                }
            }
            for my $r (keys %queue) {
                my $q = $queue{$r};
                while (@$q && $q->[0][0] <= time) {
                    my $item = shift @$q;
                    syswrite($peer{$r}, $item->[1]) if $peer{$r};
                }
            }
            if (open my $fh, '>', "$stats.tmp") {
                print $fh join("\n", map { $count{$_} } sort keys %count),
                    "\n";
                close $fh;
                rename "$stats.tmp", $stats;
            }
        }
    });
    $t->wait_port($port) or die "slow link on $port not listening";
    return $pid;
}

$t->run_redis;

###########################################################################
# A. 3 000 events behind a 100 ms link, two workers

{
    conf('relay', '', worker_processes => 2);
    $t->run;    # the link is not there yet: everything is spooled

    my $N = 3000;
    my $job = $t->start_load(clients => 4, requests => $N / 4,
        path => '/ev');
    my $res = $t->wait_load($job, timeout => 120);
    is($res->{answered}, $N, "$N requests answered while Redis is away");
    ok($t->wait_until(sub { events_metric('spooled') >= $N }, timeout => 5),
        "$N events spooled");

    my $stats = $t->testdir . '/link.txt';
    my $t0 = time;
    my $link = run_slow_link($t->port('relay'), $t->redis_port, 0.1, $stats);

    my $done = $t->wait_until(sub {
        ($t->redis_query('XLEN', 'cg:events') // 0) >= $N
    }, timeout => 20, interval => 0.02);
    my $took = time - $t0;
    ok($done, "the $N events are written");
    diag(sprintf 'A: %d events over a 100 ms link in %.2f s', $N, $took);
    cmp_ok($took, '<', 3, sprintf('in a few round trips, not 47 or more'
        . ' (%.2f s)', $took));

    my @per = grep { length } split /\n/, ($t->read_file('link.txt') // '');
    # each worker drains once connected; one whose reconnection delay ends
    # after the spool is empty (up to 2 s, with jitter) finds nothing left
    my @busy = grep { $_ >= 4 } @per;
    cmp_ok(scalar @busy, '>=', 1, 'spooled events written in script calls'
        . ' of up to 32 (EVALSHA per connection: ' . join(' ', @per) . ')');

    is($t->redis_query('XLEN', 'cg:events'), $N, 'each event once');
    is(events_metric('dropped'), 0, 'nothing dropped');

    $t->stop;
    $t->stop_daemon($link);
    $t->redis_query('DEL', 'cg:events');
}

###########################################################################
# B. the directive

{
    for my $bad ('0', '16385', 'lots') {
        conf('redis', "    civicgate_event_drain_inflight $bad;\n");
        my ($rc, $out) = $t->test_config;
        isnt($rc, 0, "nginx -t rejects civicgate_event_drain_inflight $bad");
    }
    conf('redis', "    civicgate_event_drain_inflight 512;\n"
        . "    civicgate_event_drain_inflight 1024;\n");
    my ($rc, $out) = $t->test_config;
    like($out, qr/"civicgate_event_drain_inflight" directive is duplicate/,
        'nginx -t rejects a repeated civicgate_event_drain_inflight');
    conf('redis', "    civicgate_event_drain_inflight 16384;\n");
    ($rc, $out) = $t->test_config;
    is($rc, 0, 'civicgate_event_drain_inflight 16384 is accepted')
        or diag $out;
}

###########################################################################
# C. a full spool of about 32 000 events into a local redis-server

SKIP: {
    my $wrk = Civicgate::Test::_which('wrk');
    skip 'wrk not found', 5 unless $wrk;

    $t->stop_redis;
    conf('redis', "    civicgate_event_buffer 4m;\n", worker_processes => 2);
    $t->run;

    my $url = 'http://127.0.0.1:' . $t->port(0) . '/ev';
    for (1 .. 10) {
        last if events_metric('dropped') > 0;
        system("$wrk -t1 -c8 -d2s $url >/dev/null 2>&1");
    }
    my $sp = events_metric('spooled');
    cmp_ok(events_metric('dropped'), '>', 0, "the spool is full ($sp events)");
    cmp_ok($sp, '>', 28000, 'a 4m spool holds over 28 000 events');

    $t->run_redis;
    my $t0 = time;
    my $done = $t->wait_until(sub {
        ($t->redis_query('XLEN', 'cg:events') // 0) >= $sp
    }, timeout => 60, interval => 0.02);
    my $took = time - $t0;
    ok($done, "the $sp spooled events are written");
    diag(sprintf 'C: %d events drained in %.2f s: %.0f events/s',
        $sp, $took, $sp / $took);
    is($t->redis_query('XLEN', 'cg:events'), $sp, 'each event once');
    ok($t->wait_until(sub { events_metric('written') >= $sp }),
        'events_total{result=written} = spooled');
}

$t->done_testing;
