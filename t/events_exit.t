#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# What the event spool logs and keeps when nginx exits or reloads, Redis
# down throughout:
#
# A. Drops: the "event buffer full, N journey events dropped" lines add up
#    to the dropped counter, the last ones written when nginx quits.
# B. nginx -s quit logs, at warn, how many spooled events are discarded.
# C. nginx -s reload keeps the spool: the events reach Redis when it is
#    back, and nothing is logged as discarded.
# D. A reload that changes civicgate_event_buffer carries the events over
#    to the new zone (as many as fit, the oldest first) and logs it; an
#    event an old worker spools after that is counted as discarded.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use IO::Socket::INET;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $KEY = random_key_hex(32);

my $HTTP = <<'EOF';
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;
    civicgate_event_buffer %%SIZE%%;

    server {
        listen 127.0.0.1:%%PORT_LISTEN%%;
        server_name localhost;

        civicgate_journey on;

        location /ev {
            civicgate_service exit;
            return 200 "ok\n";
        }
        location /slow {
            civicgate_service slow;
            proxy_pass http://127.0.0.1:%%PORT_slow%%;
            proxy_read_timeout 10s;
        }
        location = /metrics {
            civicgate_events off;
            civicgate_metrics;
        }
    }
EOF

sub conf_for {
    my ($n, $size) = @_;
    (my $h = $HTTP) =~ s/%%SIZE%%/$size/;
    my $listen = $n->name eq 'main' ? 0 : $n->name;
    $h =~ s/%%PORT_LISTEN%%/%%PORT_${listen}%%/;
    $n->write_secret_file('keys', [ [ k1 => $KEY ] ]);
    $n->write_nginx_conf($h);
}

sub port_of { $t->port($_[0]->name eq 'main' ? 0 : $_[0]->name) }

sub events_metric {
    my ($n, $result) = @_;
    return metric($n->metrics(port => port_of($n)), 'civicgate_events_total',
        result => $result) // 0;
}

# requests numbered by a query argument, their journeys returned in order
sub hit {
    my ($n, $count) = @_;
    my @j;
    for (1 .. $count) {
        my $r = $n->request('/ev', port => port_of($n));
        push @j, $r->status == 200 ? $r->header('X-Journey-ID') : 'failed';
    }
    return @j;
}

sub sum_dropped {
    my ($log) = @_;
    my $sum = 0;
    $sum += $1 while $log =~
        /\[warn\].*civicgate: event buffer full, (\d+) journey events dropped/g;
    return $sum;
}

###########################################################################
# A, B. a full spool: drops add up, quit reports what is discarded

{
    my $n = $t->nginx('full');
    conf_for($n, '32k');
    $n->run;

    # 32k: 228 slots of 96 bytes, one per event here
    my $N = 260;
    my @j = hit($n, $N);
    is(scalar(grep { $_ eq 'failed' } @j), 0, "$N requests answered");
    my $sp = events_metric($n, 'spooled');
    my $dr = events_metric($n, 'dropped');
    is($sp + $dr, $N, "spooled + dropped = $N ($sp + $dr)");
    cmp_ok($dr, '>', 0, 'events dropped');

    my $mark = $n->log_mark;
    $n->stop;
    my $log = $n->error_log;
    is(sum_dropped($log), $dr,
        "the drop lines add up to the counter: $dr, the rest logged at exit");
    like($n->log_since($mark), qr/\[warn\].*civicgate: event buffer full/,
        'a drop line at exit');
    like($log, qr/\[warn\].*civicgate: nginx exiting, $sp journey events in the spool discarded/,
        "quit: [warn] $sp spooled events discarded");
}

###########################################################################
# C. reload keeps the spool

{
    my $n = $t->nginx('reload');
    conf_for($n, '64k');
    $n->run;

    my @j = hit($n, 50);
    is(events_metric($n, 'spooled'), 50, '50 events spooled');

    my $mark = $n->log_mark;
    ok($n->reload, 'reloaded');
    my @j2 = hit($n, 10);

    $t->run_redis;
    ok($t->wait_until(sub {
        ($t->redis_query('XLEN', 'cg:events') // 0) >= 60
    }, timeout => 10), 'Redis back: the events spooled before and after'
        . ' the reload are written');
    my @got = map { $_->{f}{journey} } @{ $t->redis_stream('cg:events') };
    is_deeply(\@got, [ @j, @j2 ], 'all 60, oldest first');
    unlike($n->log_since($mark), qr/discarded/, 'nothing logged discarded');

    $n->stop;
    unlike($n->log_since($mark), qr/discarded/,
        'nor when it quits with an empty spool');
    $t->stop_redis;
}

###########################################################################
# D. reloads that resize the spool

{
    my $n = $t->nginx('resize');
    conf_for($n, '64k');
    $n->run;

    # a backend that answers after 1.5 s: a request in an old worker
    my $slow = $t->run_daemon(sub {
        my $l = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
            LocalPort => $t->port('slow'), Listen => 16, ReuseAddr => 1)
            or die "listen: $!";
        while (my $c = $l->accept) {
            sysread($c, my $buf, 65536);
            sleep 1.5;
            syswrite($c, "HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
            close $c;
        }
    });
    $t->wait_port($t->port('slow'));

    my @j = hit($n, 200);
    is(events_metric($n, 'spooled'), 200, '200 events spooled in 64k');

    # grow: everything carried over
    conf_for($n, '128k');
    my $mark = $n->log_mark;
    ok($n->reload, 'reloaded with 128k');
    like($n->log_since($mark), qr/\[notice\].*civicgate: event buffer resized, 200 journey events carried over, 0 dropped/,
        '[notice] 200 carried over, 0 dropped');
    push @j, hit($n, 40);

    # shrink below what waits (240; 32k holds 228), with a request in progress in a worker
    # that becomes an old one: its event is spooled after the copy
    my $req = $t->start_load(clients => 1, requests => 1, path => '/slow',
        port => port_of($n), timeout => 8);
    sleep 0.5;
    conf_for($n, '32k');
    $mark = $n->log_mark;
    ok($n->reload(timeout => 15), 'reloaded with 32k, after the slow request');
    my $res = $t->wait_load($req, timeout => 10);
    is($res->{answered}, 1, 'the slow request is answered by the old worker');
    my $since = $n->log_since($mark);
    like($since, qr/\[warn\].*civicgate: event buffer resized, 228 journey events carried over, 12 dropped/,
        '[warn] 228 carried over, 12 dropped');
    ok($n->wait_for_log(qr/\[warn\].*civicgate: event buffer resized, 1 journey events spooled since then discarded/,
        since => $mark, timeout => 5),
        '[warn] the old worker\'s late event discarded');

    $t->run_redis;
    ok($t->wait_until(sub {
        ($t->redis_query('XLEN', 'cg:events') // 0) >= 228
    }, timeout => 10), 'Redis back: the carried-over events are written');
    sleep 0.5;
    my @got = map { $_->{f}{journey} } @{ $t->redis_stream('cg:events') };
    is_deeply(\@got, [ @j[0 .. 227] ], 'the oldest 228, in order');

    $n->stop;
    $t->stop_daemon($slow);
}

$t->done_testing;
