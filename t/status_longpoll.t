#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Long-poll on the status endpoint (two workers): ?wait=N with a matching
# If-None-Match answers 200 with the new body and ETag as soon as an admin
# change lands (on whichever worker), or 304 at the deadline; the wait is
# capped by civicgate_status_max_wait; without a match, or without wait,
# the answer is immediate.  The longpoll clients gauge follows them.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);
use Civicgate::Status qw(:all);

my $t = Civicgate::Test->new;

# an admin change reaches a waiting client within this (the goal is
# 100 ms; the machine is small and shared)
my $LATENCY = 0.3;

# reuseport: the kernel spreads connections over both workers
$t->write_nginx_conf(status_http(listen => 'reuseport',
    status => 'add_header X-Pid $pid always;', locations => <<'EOF'),
location /capped/status/ {
    civicgate_status;
    civicgate_status_max_wait 2s;
}
EOF
    worker_processes => 2);

$t->run_redis;
$t->run;

sub admin_put {
    my ($name, $state) = @_;
    return admin_service($t, PUT => $name, { state => $state });
}

sub longpolls { status_clients($t, 'longpoll') }

sub timed {
    my ($path, @h) = @_;
    my $t0 = time;
    my $r = $t->request($path, headers => \@h, timeout => 70);
    return ($r, time - $t0);
}

# both workers reached Redis
ok($t->wait_until(sub { reached_redis($t, tries => 6) }, timeout => 5),
    'status not stale on either worker');

my $E = $t->request('/status/')->header('ETag');
like($E // '', qr/^"[^"]+"$/, 'ETag');

###########################################################################
# no change: 304 at the deadline; immediate answers

{
    my ($r, $el) = timed('/status/?wait=1', 'If-None-Match' => $E);
    is($r->status, 304, 'wait=1, matching If-None-Match, no change: 304');
    is($r->header('ETag'), $E, '304 with the ETag');
    is($r->body, '', '304 without a body');
    ok($el >= 0.9 && $el < 2.5, sprintf('answered at the deadline (%.3f s)',
        $el));

    ($r, $el) = timed('/status/?wait=0', 'If-None-Match' => $E);
    is($r->status, 304, 'wait=0, matching: 304');
    ok($el < 0.5, sprintf('wait=0: at once (%.3f s)', $el));

    ($r, $el) = timed('/status/', 'If-None-Match' => $E);
    is($r->status, 304, 'no wait, matching: 304');
    ok($el < 0.5, sprintf('no wait: at once (%.3f s)', $el));

    ($r, $el) = timed('/status/?wait=30', 'If-None-Match' => '"other"');
    is($r->status, 200, 'wait=30, If-None-Match not matching: 200');
    is($r->header('ETag'), $E, '  with the current ETag');
    ok($el < 0.5, sprintf('  at once (%.3f s)', $el));

    ($r, $el) = timed('/status/?wait=30');
    is($r->status, 200, 'wait=30 without If-None-Match: 200');
    ok($el < 0.5, sprintf('  at once (%.3f s)', $el));

    # civicgate_status_max_wait 2s caps wait=30
    my $ce = $t->request('/capped/status/')->header('ETag');
    ($r, $el) = timed('/capped/status/?wait=30', 'If-None-Match' => $ce);
    is($r->status, 304, 'capped: 304');
    ok($el >= 1.8 && $el < 4, sprintf('wait=30 capped by max_wait 2s'
        . ' (%.3f s)', $el));
}

###########################################################################
# a change wakes every waiting client, on both workers, at once

{
    is(longpolls(), 0, 'longpoll gauge 0');
    my $EN = $t->request('/status/?lang=en')->header('ETag');
    my (@c, @want);
    for my $i (0 .. 15) {
        my $en = $i % 4 == 3;
        push @c, $t->sse_open(($en ? '/status/?lang=en&wait=20'
            : '/status/?wait=20'), accept => undef, close => 1,
            headers => [ 'If-None-Match' => $en ? $EN : $E ]);
        push @want, $en ? 'en' : 'id';
    }
    sse_pump(\@c, 0.5);
    is(scalar(grep { $_->closed || $_->head_done } @c), 0,
        '16 long-polls waiting');
    ok($t->wait_until(sub { (longpolls() // -1) == 16 }, timeout => 3),
        'longpoll gauge 16') or diag longpolls();

    my $t0 = time;
    my $p = admin_put('tax', 'outage');
    is($p->status, 200, 'admin PUT tax outage');
    sse_pump(\@c, 5, sub { !grep { !$_->closed } @c });
    my $id_etag = $t->request('/status/')->header('ETag');
    my $en_etag = $t->request('/status/?lang=en')->header('ETag');
    my (@bad, %pids, $max);
    $max = 0;
    for my $i (0 .. $#c) {
        my $s = $c[$i];
        my $d = json_of($s->body);
        my $lat = ($s->first_at // 99) - $t0;
        $max = $lat if $lat > $max;
        $pids{ $s->header('X-Pid') // '?' }++;
        my $etag = $want[$i] eq 'en' ? $en_etag : $id_etag;
        push @bad, "client $i: " . join ' ', $s->status,
            $s->header('ETag') // '-',
            $d ? state_of($d, 'tax') // '-' : 'no JSON',
            $d ? $d->{lang} // '-' : '-'
            unless $s->status == 200 && ($s->header('ETag') // '') eq $etag
                && $d && (state_of($d, 'tax') // '') eq 'outage'
                && ($d->{lang} // '') eq $want[$i];
    }
    is_deeply(\@bad, [], 'every client: 200, the new ETag and body, in its'
        . ' language');
    diag(sprintf 'long-poll wake-up after a change: max %.1f ms over %d'
        . ' clients', $max * 1000, scalar @c);
    cmp_ok($max, '<', $LATENCY, sprintf('all answered within %d ms of the'
        . ' change (max %.1f ms)', $LATENCY * 1000, $max * 1000));
    is(scalar(grep { $_ ne '?' } keys %pids), 2,
        'the clients were on both workers') or diag explain \%pids;
    ok($t->wait_until(sub { (longpolls() // -1) == 0 }, timeout => 3),
        'longpoll gauge back to 0');
}

###########################################################################
# a change made during the wait on another service; a client that leaves

{
    my $E2 = $t->request('/status/')->header('ETag');
    my $s = $t->sse_open('/status/?wait=20', accept => undef, close => 1,
        headers => [ 'If-None-Match' => $E2 ]);
    $s->pump(0.3);
    ok(!$s->head_done, 'waiting');
    my $t0 = time;
    admin_put('permits', 'maintenance');
    $s->wait_for(sub { $_[0]->closed }, 5);
    is($s->status, 200, 'a change to another service wakes it too');
    my $lat = ($s->first_at // 99) - $t0;
    cmp_ok($lat, '<', $LATENCY, sprintf('  within %d ms (%.1f ms)',
        $LATENCY * 1000, $lat * 1000));
    isnt($s->header('ETag'), $E2, '  with a new ETag');

    # clients leaving in the middle of their wait
    my $E3 = $t->request('/status/')->header('ETag');
    my @c = map { $t->sse_open('/status/?wait=20', accept => undef,
        close => 1, headers => [ 'If-None-Match' => $E3 ]) } 1 .. 4;
    ok($t->wait_until(sub { (longpolls() // -1) == 4 }, timeout => 3),
        'longpoll gauge 4');
    $_->close for @c;
    ok($t->wait_until(sub { (longpolls() // -1) == 0 }, timeout => 3),
        'clients left: longpoll gauge 0');
    # and a change afterwards is harmless
    is(admin_put('tax', 'degraded')->status, 200, 'a change after they left');
    is($t->request('/status/')->status, 200, 'still serving');
}

$t->done_testing;
