#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Delays: without nodelay the excess requests of a burst are held back by
# one interval each; nodelay passes them at once; delay=N lets the first
# N excess requests through undelayed.  Dry run: decisions computed and
# logged, nothing enforced, no quota consumed, *_DRY_RUN statuses.
#
# Timing tolerance: the requests of a burst go out in parallel (one
# connection each); the k-th admitted answer (sorted by arrival) must come
# after at least k intervals minus 40 ms and within k intervals plus
# 250 ms; consecutive ones 40-200 ms apart; "fast" means under 80 ms.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Select;
use IO::Socket::INET;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new(redis => 0);

my $RUN = sprintf '%x', int(rand(2**31));

$t->write_file('file.txt', "static\n");

$t->write_nginx_conf(<<'EOF');
    civicgate_limit_zone $http_x_key zone=dl:1m rate=10r/s;
    civicgate_limit_zone $http_x_key zone=nd:1m rate=10r/s;
    civicgate_limit_zone $http_x_key zone=d2:1m rate=10r/s;
    civicgate_limit_zone $http_x_key zone=dz:1m rate=2r/s;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        add_header X-Limit-Status $civicgate_limit_status always;

        location = /delay {
            civicgate_limit zone=dl burst=5;
            alias %%TESTDIR%%/file.txt;
        }
        location = /nodelay {
            civicgate_limit zone=nd burst=5 nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /delay2 {
            civicgate_limit zone=d2 burst=5 delay=2;
            alias %%TESTDIR%%/file.txt;
        }
        location = /dz-enforce {
            civicgate_limit zone=dz burst=2 nodelay;
            civicgate_limit_headers on;
            alias %%TESTDIR%%/file.txt;
        }
        location = /dz-dry {
            civicgate_limit zone=dz burst=2;
            civicgate_limit_dry_run on;
            alias %%TESTDIR%%/file.txt;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }
EOF

$t->run;

# n requests in parallel; returns [ { r => response, el => seconds } ]
# in the order of the answers' completion
sub parallel {
    my ($path, $key, $n) = @_;
    local $SIG{PIPE} = 'IGNORE';
    my $req = "GET $path HTTP/1.1\r\nHost: localhost\r\n"
        . "Connection: close\r\nX-Key: $key\r\n\r\n";
    my (@s, %buf, %idx);
    for my $i (0 .. $n - 1) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $t->port(0), Proto => 'tcp') or die "connect: $!";
        push @s, $s;
        $idx{ fileno $s } = $i;
    }
    my $t0 = time;
    syswrite($_, $req) for @s;
    my $sel = IO::Select->new(@s);
    my @out;
    while ($sel->count && time - $t0 < 10) {
        for my $s ($sel->can_read(0.5)) {
            my $i = $idx{ fileno $s };
            my $n = sysread($s, my $chunk, 65536);
            if ($n) {
                $buf{$i} .= $chunk;
                next;
            }
            push @out, { r => parse_response($buf{$i}), el => time - $t0 };
            $sel->remove($s);
            close $s;
        }
    }
    return \@out;
}

sub ms { sprintf '%.0f', $_[0] * 1000 }

sub counts {
    my ($zone) = @_;
    my $m = $t->metrics;
    return { map { $_ => metric($m, 'civicgate_limit_requests_total',
        zone => $zone, result => $_) // 'undef' }
        qw(passed delayed rejected delayed_dry_run rejected_dry_run) };
}

sub delta {
    my ($a, $b) = @_;
    return { map { $_ => $b->{$_} - $a->{$_} } keys %$a };
}

###########################################################################
# burst=5, delay 0 (default): each excess request waits one more interval

{
    my $m0 = counts('dl');
    my $mark = $t->log_mark;
    my $res = parallel('/delay', "dl-$RUN", 8);
    my @ok = grep { $_->{r}->status == 200 } @$res;
    my @rej = grep { $_->{r}->status == 429 } @$res;
    is(scalar @ok, 6, 'delay: 6 of 8 parallel requests admitted');
    is(scalar @rej, 2, 'delay: 2 rejected');
    ok(!grep({ $_->{el} >= 0.08 } @rej), 'delay: rejections are not delayed')
        or diag join ' ', map { ms($_->{el}) } @rej;

    my @el = map { $_->{el} } @ok;
    diag('delay: answers after ' . join(' ', map { ms($_) } @el) . ' ms');
    ok(@el && $el[0] < 0.08, 'delay: the first one is not delayed');
    my $bad = 0;
    for my $k (1 .. $#el) {
        $bad++ unless $el[$k] >= $k * 0.1 - 0.04 && $el[$k] <= $k * 0.1 + 0.25;
        my $d = $el[$k] - $el[$k - 1];
        $bad++ unless $d >= 0.04 && $d <= 0.2;
    }
    ok(!$bad, 'delay: the k-th waits about k intervals (100 ms each), '
        . 'monotonically');
    ok(@el == 6 && $el[5] >= 0.35, 'delay: the 6th takes >= 350 ms');
    is(join(' ', map { $_->{r}->header('X-Limit-Status') // '' } @ok),
        'PASSED ' . join(' ', ('DELAYED') x 5),
        'delay: $civicgate_limit_status PASSED, then DELAYED');
    is(join(' ', map { $_->{r}->header('X-Limit-Status') // '' } @rej),
        'REJECTED REJECTED', 'delay: REJECTED for the rejected');
    ok(!grep({ ($_->{r}->body // '') ne "static\n" } @ok),
        'delay: delayed requests are served normally');
    my $log = $t->log_since($mark);
    my @d = $log =~ /\[warn\][^\n]*civicgate: delaying request by (\d+)ms/g;
    is(scalar @d, 5, 'delay: 5 "delaying request by Nms" lines at [warn] '
        . '(one level below the default error)') or diag $log;
    @d = sort { $a <=> $b } @d;
    ok(@d == 5 && !grep({ $d[$_] < ($_ + 1) * 100 - 30
        || $d[$_] > ($_ + 1) * 100 } 0 .. 4),
        "delay: logged delays about 100..500 ms (@d)");
    is_deeply(delta($m0, counts('dl')), { passed => 1, delayed => 5,
        rejected => 2, delayed_dry_run => 0, rejected_dry_run => 0 },
        'delay: metrics passed +1, delayed +5, rejected +2');
}

###########################################################################
# nodelay: all admitted at once

{
    my $res = parallel('/nodelay', "nd-$RUN", 6);
    my @ok = grep { $_->{r}->status == 200 } @$res;
    is(scalar @ok, 6, 'nodelay: 6 of 6 admitted');
    ok(!grep({ $_->{el} >= 0.1 } @$res), 'nodelay: all within 100 ms ('
        . join(' ', map { ms($_->{el}) } @$res) . ' ms)');
    is(join(' ', map { $_->{r}->header('X-Limit-Status') // '' } @ok),
        join(' ', ('PASSED') x 6), 'nodelay: all PASSED');
}

###########################################################################
# delay=2: the first 3 undelayed, then one interval more each

{
    my $res = parallel('/delay2', "d2-$RUN", 6);
    my @ok = grep { $_->{r}->status == 200 } @$res;
    is(scalar @ok, 6, 'delay=2: 6 of 6 admitted');
    my @el = map { $_->{el} } @ok;
    diag('delay=2: answers after ' . join(' ', map { ms($_) } @el) . ' ms');
    ok(@el == 6 && !grep({ $el[$_] >= 0.08 } 0 .. 2),
        'delay=2: the first 3 are not delayed');
    my $bad = 0;
    for my $k (3 .. $#el) {
        my $n = $k - 2;
        $bad++ unless $el[$k] >= $n * 0.1 - 0.04 && $el[$k] <= $n * 0.1 + 0.25;
    }
    ok(@el == 6 && !$bad, 'delay=2: then 1, 2, 3 intervals');
    is(join(' ', map { $_->{r}->header('X-Limit-Status') // '' } @ok),
        'PASSED PASSED PASSED DELAYED DELAYED DELAYED',
        'delay=2: 3 PASSED, 3 DELAYED');
}

###########################################################################
# clients that leave while delayed: no harm

{
    local $SIG{PIPE} = 'IGNORE';
    my @s;
    for (1 .. 6) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $t->port(0), Proto => 'tcp') or next;
        syswrite($s, "GET /delay HTTP/1.1\r\nHost: localhost\r\n"
            . "Connection: close\r\nX-Key: gone-$RUN\r\n\r\n");
        push @s, $s;
    }
    sleep 0.15;
    close $_ for @s;
    sleep 0.6;
    is($t->request('/nodelay', headers => [ 'X-Key' => "after-$RUN" ])
        ->status, 200, 'clients closed while delayed: nginx still serves');
}

###########################################################################
# dry run: computed and logged, not enforced; what passes is accounted in
# the zone as usual, as limit_req_dry_run does

{
    my $key = "dz-$RUN";
    my $m0 = counts('dz');
    my $mark = $t->log_mark;
    my $t0 = time;
    my $get = sub {
        my ($p) = @_;
        my $s = time;
        my $r = $t->request($p, headers => [ 'X-Key' => $key ]);
        return ($r, time - $s);
    };

    my ($r, $el) = $get->('/dz-dry');
    is($r->status . ' ' . ($r->header('X-Limit-Status') // ''), '200 PASSED',
        'dry run: idle key: PASSED');
    ($r) = $get->('/dz-enforce');
    like($r->header('RateLimit') // '', qr/^"dz";r=1;t=\d+;/,
        'the dry run request was accounted: the enforcing location sees '
        . 'one request before its own (r=1)');
    is($r->status, 200, 'enforcing location: its first request passes');

    ($r, $el) = $get->('/dz-dry');
    is($r->status . ' ' . ($r->header('X-Limit-Status') // ''),
        '200 DELAYED_DRY_RUN', 'dry run: would be delayed: DELAYED_DRY_RUN');
    ok($el < 0.2, 'dry run: ... but not delayed (' . ms($el) . ' ms; the '
        . 'delay would be ~1000 ms)');

    ($r) = $get->('/dz-enforce');
    is($r->status, 429, 'enforcing: rejected at burst + 2, the dry run '
        . 'requests included');

    my @dry;
    for (1 .. 3) {
        ($r, $el) = $get->('/dz-dry');
        push @dry, [ $r, $el ];
    }
    is(join(' ', map { $_->[0]->status } @dry), '200 200 200',
        'dry run: over the limit, still served');
    is(join(' ', map { $_->[0]->header('X-Limit-Status') // '' } @dry),
        'REJECTED_DRY_RUN REJECTED_DRY_RUN REJECTED_DRY_RUN',
        'dry run: REJECTED_DRY_RUN');
    ok(!grep({ defined $_->[0]->header('Retry-After') } @dry),
        'dry run: no Retry-After');
    ok(!grep({ ($_->[0]->body // '') ne "static\n" } @dry),
        'dry run: the file is served');

    ($r) = $get->('/dz-enforce');
    is($r->status, 429, 'enforcing: still rejected (rejections, dry or '
        . 'not, consume nothing)');

    my $elapsed = time - $t0;
    diag(sprintf 'dry run sequence took %.0f ms', $elapsed * 1000)
        if $elapsed > 0.2;

    my $log = $t->log_since($mark);
    ok($log =~ /\[error\][^\n]*civicgate: limiting requests, dry run/,
        'dry run: a "dry run" line at [error]') or diag $log;
    is_deeply(delta($m0, counts('dz')), { passed => 2, delayed => 0,
        rejected => 2, delayed_dry_run => 1, rejected_dry_run => 3 },
        'dry run: metrics delayed_dry_run +1, rejected_dry_run +3');
}

$t->done_testing;
