#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# civicgate store=local decides like nginx's own limit_req: the same
# schedule of requests (bursts and pauses, about 3 s) against a limit_req
# location and a civicgate location with the same rate and burst (nodelay),
# in the same nginx, gives identical decision sequences.
#
# Timing design: rate 10r/s (interval 100 ms), burst 2; pauses are
# multiples of 50 ms chosen so that, in the exact model, no request lands
# within 26 ms of an admission boundary, even when each request of a burst
# goes out up to 12 ms after the previous one (checked below, with the
# model, before anything is sent).  Each step sends the limit_req request
# and then the civicgate request (a second pass: the other way round),
# and every send time is recorded.
#
# Tolerance: if the two sequences still differ, the first difference is
# tolerated only when the exact model, run on the recorded send times,
# puts that request within 5 ms of a boundary (reported with a diag);
# otherwise it is a failure.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new(redis => 0);

my $T = 100;         # ms
my $B = 2;
my $RUN = sprintf '%x', int(rand(2**31));

# [ pause before the group (ms), requests in the group ]
my @SCHEDULE = ([0, 2], [50, 3], [0, 3], [0, 3], [1050, 2], [350, 1],
    [350, 2], [150, 3], [1050, 1]);

$t->write_file('file.txt', "static\n");

$t->write_nginx_conf(<<"EOF");
    limit_req_zone \$http_x_key zone=lr:1m rate=10r/s;
    civicgate_limit_zone \$http_x_key zone=cg:1m rate=10r/s store=local;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        location = /lr {
            limit_req zone=lr burst=$B nodelay;
            limit_req_status 429;
            alias %%TESTDIR%%/file.txt;
        }
        location = /cg {
            civicgate_limit zone=cg burst=$B nodelay;
            alias %%TESTDIR%%/file.txt;
        }
    }
EOF

$t->run;

# the exact GCRA model (= limit_req's leaky bucket) over times in ms;
# returns the decisions (1/0) and each request's distance from the
# admission threshold (negative: admitted with that much room)
sub model {
    my (@times) = @_;
    my ($tat, @d, @dist);
    for my $now (@times) {
        my $ex = defined $tat && $tat > $now ? $tat - $now : 0;
        my $dist = $ex - $B * $T;
        push @dist, $dist;
        if ($dist <= 0) {
            $tat = ($ex ? $tat : $now) + $T;
            push @d, 1;
        } else {
            push @d, 0;
        }
    }
    return (\@d, \@dist);
}

sub nominal_times {
    my ($spacing) = @_;
    my ($at, @times) = (0);
    for my $g (@SCHEDULE) {
        $at += $g->[0];
        push @times, $at + $_ * $spacing for 0 .. $g->[1] - 1;
    }
    return @times;
}

# the schedule keeps clear of the boundaries
{
    my ($d0) = model(nominal_times(0));
    my $min = 1e9;
    my $same = 1;
    for my $sp (1, 3, 6, 9, 12) {
        my ($d, $dist) = model(nominal_times($sp));
        $same &&= "@$d" eq "@$d0";
        for (@$dist) { $min = abs $_ if abs $_ < $min }
    }
    ok($same && $min >= 26, "schedule: no request within 26 ms of a "
        . "boundary (closest $min ms), for 0-12 ms between requests");
    my $adm = grep { $_ } @$d0;
    ok($adm >= 5 && @$d0 - $adm >= 5, "schedule: $adm admitted, "
        . (@$d0 - $adm) . ' rejected: both outcomes exercised');
}

sub run_schedule {
    my ($first, $second, $key) = @_;
    my (%seq, %times);
    my $t0 = time;
    my $at = 0;
    for my $g (@SCHEDULE) {
        $at += $g->[0];
        my $wait = $t0 + $at / 1000 - time;
        sleep $wait if $wait > 0;
        for (1 .. $g->[1]) {
            for my $loc ($first, $second) {
                push @{ $times{$loc} }, (time - $t0) * 1000;
                my $r = $t->request("/$loc", headers => [ 'X-Key' => $key ]);
                push @{ $seq{$loc} }, $r->status == 200 ? 1
                    : $r->status == 429 ? 0 : "?" . $r->status;
            }
        }
    }
    return (\%seq, \%times);
}

for my $pass ([qw(lr cg)], [qw(cg lr)]) {
    my $name = "$pass->[0] first";
    my ($seq, $times) = run_schedule(@$pass, "key-$pass->[0]-$RUN");
    my ($lr, $cg) = (join(' ', @{ $seq->{lr} }), join(' ', @{ $seq->{cg} }));

    if ($lr eq $cg) {
        pass("$name: identical decisions ($cg)");
    } else {
        my @l = @{ $seq->{lr} };
        my @c = @{ $seq->{cg} };
        my ($i) = grep { $l[$_] ne $c[$_] } 0 .. $#l;
        my (undef, $dl) = model(@{ $times->{lr} });
        my (undef, $dc) = model(@{ $times->{cg} });
        my $near = abs($dl->[$i]) < 5 || abs($dc->[$i]) < 5;
        ok($near, "$name: decisions differ only on a boundary "
            . "(request $i: " . sprintf('%.1f/%.1f', $dl->[$i], $dc->[$i])
            . ' ms from it)');
        diag("limit_req: $lr");
        diag("civicgate: $cg");
    }

    # each against the exact model at its recorded send times
    for my $loc (qw(lr cg)) {
        my ($d, $dist) = model(@{ $times->{$loc} });
        my $min = 1e9;
        for (@$dist) { $min = abs $_ if abs $_ < $min }
        is(join(' ', @{ $seq->{$loc} }), "@$d", "$name: $loc follows the "
            . sprintf('model at the send times (closest %.1f ms)', $min));
    }
}

$t->done_testing;
