#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The fault proxy itself, between a plain RESP client and a real
# redis-server: each mode does what the fault tests rely on (pass, delay,
# blackhole, reset, truncate close/stall, drip), switched at run time, on
# connections already open and on new ones.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Select;
use IO::Socket::INET;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);
use Civicgate::FaultProxy;

my $t = Civicgate::Test->new;
$t->run_redis(port => 'real');
my $p = Civicgate::FaultProxy->start($t, listen => $t->port('proxy'),
    to => $t->redis_port);

sub conn {
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $p->port, Proto => 'tcp', Timeout => 2)
        or die "connect: $!";
    $s->blocking(0);
    return $s;
}

# sends PING, reads for up to $wait s: (bytes read, 'eof' | 'reset' |
# 'open', seconds until the first byte)
sub ping {
    my ($s, $wait, $want) = @_;
    local $SIG{PIPE} = 'IGNORE';
    syswrite($s, "PING\r\n") unless $want && $want eq 'listen';
    my ($got, $state, $first, $t0) = ('', 'open', undef, time);
    my $sel = IO::Select->new($s);
    while (time < $t0 + $wait) {
        last if $want && $want ne 'listen' && length $got >= $want;
        next unless $sel->can_read(0.05);
        my $n = sysread($s, my $buf, 4096);
        if (!defined $n) {
            next if $!{EAGAIN};
            $state = $!{ECONNRESET} ? 'reset' : "error $!";
            last;
        }
        if ($n == 0) { $state = 'eof'; last }
        $first //= time - $t0;
        $got .= $buf;
    }
    return ($got, $state, $first);
}

my ($got, $state, $first);

my $a = conn();
($got) = ping($a, 2, 7);
is($got, "+PONG\r\n", 'pass: PONG');

$p->mode('delay', 400);
($got, $state, $first) = ping($a, 3, 7);
is($got, "+PONG\r\n", 'delay 400: PONG');
cmp_ok($first, '>=', 0.75, sprintf('delay 400: both ways delayed '
    . '(%.3f s)', $first // -1));

$p->mode('drip', 100);
($got, $state, $first) = ping($a, 3, 7);
is($got, "+PONG\r\n", 'drip 100: PONG in the end');
my $t0 = time;
($got) = ping($a, 0.35);
cmp_ok(length $got, '<', 7, 'drip 100: not all of it after 0.35 s ('
    . length($got) . ' bytes)');
$p->mode('pass');
my ($rest) = ping($a, 2, 14 - length $got);
is($got . $rest, "+PONG\r\n+PONG\r\n", 'back to pass: the rest, in order');

$p->mode('truncate', 'stall');
($got, $state) = ping($a, 0.8);
is($got, '+PO', 'truncate stall: half a reply');
is($state, 'open', 'truncate stall: the connection stays open');
$p->mode('pass');
($got, $state) = ping($a, 0.5);
is($got, '', 'truncate stall: silent for good, also in pass mode');
my $b = conn();
($got) = ping($b, 2, 7);
is($got, "+PONG\r\n", 'a new connection passes');

$p->mode('truncate', 'close');
($got, $state) = ping($b, 2);
is($got, '+PO', 'truncate close: half a reply');
is($state, 'eof', 'truncate close: then closed');

$p->mode('pass');
my $c = conn();
is((ping($c, 2, 7))[0], "+PONG\r\n", 'pass again');
$p->mode('blackhole');
($got, $state) = ping($c, 0.8);
is("$got/$state", '/open', 'blackhole: an open connection goes silent');
my $d = conn();
($got, $state) = ping($d, 0.8);
is("$got/$state", '/open', 'blackhole: a new connection is accepted, silent');
$p->mode('pass');
($got) = ping($d, 0.5);
is($got, '', 'blackholed connections stay silent after the fault');

$p->mode('reset');
is($p->stats->{open}, 0, 'reset: no connection left open');
{
    # the RST may come before the connect returns; read without writing
    # first: a write that meets the RST consumes it (EPIPE, then EOF)
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $p->port, Proto => 'tcp', Timeout => 2);
    ($got, $state) = $s ? ping($s, 2, 'listen')
                        : ('', $!{ECONNRESET} ? 'reset' : $!);
    is($state, 'reset', 'reset: a new connection gets an RST');
}
$p->mode('pass');
my $e = conn();
ok($p->wait_connections(1, 2), 'a connection open before reset');
$p->mode('reset');
# read without writing first: a write would consume the reset (EPIPE)
($got, $state) = ping($e, 2, 'listen');
is($state, 'reset', 'reset: an open connection is reset');

$p->mode('pass');
is((ping(conn(), 2, 7))[0], "+PONG\r\n", 'pass after reset');

my $stats = $p->stats;
cmp_ok($stats->{accepted}, '>=', 7, "stats: $stats->{accepted} accepted");
is($stats->{mode}, 'pass', 'stats: the mode');
eval { $p->mode('drip') };
like($@, qr/ERR/, 'a mode without its argument is refused');
eval { $p->mode('nonsense') };
like($@, qr/ERR/, 'an unknown mode is refused');

$t->done_testing;
