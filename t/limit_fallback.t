#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Redis unavailable: on_error=local enforces the rate per gateway from the
# zone's shared memory (and counts the fallbacks), on_error=allow passes
# everything, on_error=deny answers 503 problem+json; once Redis answers
# again the decisions come from Redis again (one limit over both gateways).
# A client that leaves while its limit check waits on a stalled Redis does
# no harm (the reply, or the timeout, must find no freed request): no
# crash, no alert, the worker keeps serving.
#
# Timing: bursts are sent sequentially and must complete well within one
# interval (500 ms at 2r/s); if one takes longer than half an interval the
# theoretical count (burst + 1 + floor(elapsed / interval) per enforcing
# store) is used with +-1 (reported with a diag).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Digest::SHA qw(sha1_hex);
use IO::Socket::INET;
use JSON::PP ();
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $b = $t->nginx('b');

my $B = 3;
my $T = 0.5;
my $K = 4 * ($B + 1);
my $RUN = sprintf '%x', int(rand(2**31));
my $json = JSON::PP->new;

my %PORT = (a => $t->port(0), b => $t->port('b'));

for my $i ([ $t, 'PORT_0' ], [ $b, 'PORT_b' ]) {
    my ($n, $port) = @$i;
    $n->write_file('file.txt', "static\n");
    $n->write_nginx_conf(<<"EOF");
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=300ms connect_timeout=300ms;

    civicgate_limit_zone \$http_x_key zone=fl:1m rate=2r/s store=redis on_error=local;
    civicgate_limit_zone \$http_x_key zone=fa:1m rate=2r/s store=redis on_error=allow;
    civicgate_limit_zone \$http_x_key zone=fd:1m rate=2r/s store=redis on_error=deny;
    civicgate_limit_zone \$http_x_key zone=fdef:1m rate=2r/s store=redis;

    server {
        listen 127.0.0.1:%%$port%%;
        server_name localhost;

        add_header X-Limit-Status \$civicgate_limit_status always;

        location = /fl {
            civicgate_limit zone=fl burst=$B nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /fa {
            civicgate_limit zone=fa burst=$B nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /fd {
            civicgate_limit zone=fd burst=$B nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /fdef {
            civicgate_limit zone=fdef burst=$B nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /free {
            alias %%TESTDIR%%/file.txt;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }
EOF
}

$t->run_redis;
$t->run;
$b->run;

sub get {
    my ($gw, $path, $key, %o) = @_;
    return parse_response(http_get($path, port => $PORT{$gw},
        headers => [ 'X-Key' => $key ], %o));
}

sub alternate {
    my ($path, $key, $n) = @_;
    my @r;
    my $t0 = time;
    push @r, get($_ % 2 ? 'b' : 'a', $path, $key) for 0 .. $n - 1;
    return (\@r, time - $t0);
}

sub admitted {
    my ($rs, $el, $want, $stores, $name) = @_;
    my $adm = grep { $_->status == 200 } @$rs;
    if ($el < $T / 2) {
        is($adm, $want, "$name: $adm admitted (want $want)")
            or diag join ' ', map { $_->status } @$rs;
    } else {
        my $th = $want + $stores * int($el / $T);
        diag(sprintf '%s: took %.3f s: expecting %d +-1', $name, $el, $th);
        ok(abs($adm - $th) <= 1, "$name: slow: $adm admitted, theoretically "
            . "$th (+-1)");
    }
}

# fallback counters summed over both gateways
sub fallbacks {
    my %sum;
    for my $gw (qw(a b)) {
        my $m = parse_metrics(parse_response(http_get('/metrics',
            port => $PORT{$gw}))->body);
        for my $z ([ fl => 'local' ], [ fa => 'allow' ], [ fd => 'deny' ],
            [ fdef => 'local' ])
        {
            $sum{ $z->[0] } += metric($m, 'civicgate_limit_fallbacks_total',
                zone => $z->[0], on_error => $z->[1]) // -1000;
        }
    }
    return \%sum;
}

sub gateway_clients {
    return grep { ($_->{name} // '') =~ /^civicgate-/ } $t->redis_clients;
}

# warm up: both gateways connected
get($_, '/fl', "warm-$RUN") for qw(a b);
ok($t->wait_until(sub { gateway_clients() >= 2 }, timeout => 5),
    'both gateways connected to Redis');

{
    my ($rs, $el) = alternate('/fl', "up1-$RUN", $K);
    admitted($rs, $el, $B + 1, 1, 'Redis up: one limit over both gateways');
}
my $f0 = fallbacks();
is_deeply($f0, { fl => 0, fa => 0, fd => 0, fdef => 0 },
    'no fallbacks while Redis answers');

###########################################################################
# Redis down

my $mark = { a => $t->log_mark, b => $b->log_mark };
$t->stop_redis;

# let both gateways notice (these requests are fallbacks too)
sleep 0.2;
get($_, '/fl', "notice-$RUN") for qw(a b);
$f0 = fallbacks();

{
    my ($rs, $el) = alternate('/fl', "down-$RUN", $K);
    admitted($rs, $el, 2 * ($B + 1), 2,
        'Redis down, on_error=local: each gateway enforces its own burst + 1');
    my @a = @$rs[grep { $_ % 2 == 0 } 0 .. $#$rs];
    my @bb = @$rs[grep { $_ % 2 } 0 .. $#$rs];
    if ($el < $T / 2) {
        is(join(' ', map { $_->status } @a),
            join(' ', (200) x ($B + 1), (429) x (@a - $B - 1)),
            'on_error=local: gateway a: burst + 1, then 429');
        is(join(' ', map { $_->status } @bb),
            join(' ', (200) x ($B + 1), (429) x (@bb - $B - 1)),
            'on_error=local: gateway b: burst + 1, then 429');
    }
    my ($rej) = grep { $_->status == 429 } @$rs;
    is($rej ? $rej->header('X-Limit-Status') : undef, 'REJECTED',
        'on_error=local: a normal rejection (REJECTED)');
    like($rej ? $rej->header('RateLimit') // '' : '', qr/^"fl";r=0;t=\d+;pk=:/,
        'on_error=local: with its RateLimit field');
    my $f1 = fallbacks();
    is($f1->{fl} - $f0->{fl}, $K,
        "civicgate_limit_fallbacks_total{zone=\"fl\",on_error=\"local\"} +$K");
}

{
    my $f0 = fallbacks();
    my ($rs) = alternate('/fdef', "def-$RUN", $K);
    is(scalar(grep { $_->status == 200 } @$rs), 2 * ($B + 1),
        'on_error default is local');
    is(fallbacks()->{fdef} - $f0->{fdef}, $K,
        'default: counted with on_error="local"');
}

{
    my $f0 = fallbacks();
    my ($rs) = alternate('/fa', "allow-$RUN", $K);
    is(join(' ', map { $_->status } @$rs), join(' ', (200) x $K),
        "Redis down, on_error=allow: all $K pass");
    is(fallbacks()->{fa} - $f0->{fa}, $K,
        "civicgate_limit_fallbacks_total{zone=\"fa\",on_error=\"allow\"} +$K");
}

{
    my $f0 = fallbacks();
    my ($rs) = alternate('/fd', "deny-$RUN", 6);
    is(join(' ', map { $_->status } @$rs), join(' ', (503) x 6),
        'Redis down, on_error=deny: 503');
    my $r = $rs->[0];
    like($r->header('Content-Type') // '', qr{^application/problem\+json\b},
        'on_error=deny: application/problem+json');
    my $p = eval { $json->decode($r->body // '') };
    ok(ref $p eq 'HASH' && ($p->{status} // '') eq '503',
        'on_error=deny: problem status 503') or diag $r->body;
    ok(ref $p eq 'HASH' && defined $p->{type} && defined $p->{title},
        'on_error=deny: problem type and title');
    is(fallbacks()->{fd} - $f0->{fd}, 6,
        'civicgate_limit_fallbacks_total{zone="fd",on_error="deny"} +6');
}

for my $gw ([ a => $t ], [ b => $b ]) {
    my $log = $gw->[1]->log_since($mark->{ $gw->[0] });
    my $n = () = $log =~ /\[error\][^\n]*redis/g;
    is($n, 1, "gateway $gw->[0]: the outage logged at [error] once, then "
        . '[info]') or diag $log;
}

###########################################################################
# Redis back

$t->run_redis;
ok($t->wait_until(sub {
        get($_, '/free', 'x') for qw(a b);
        gateway_clients() >= 2 }, timeout => 10, interval => 0.2),
    'both gateways reconnected (backoff <= 2 s)');
for my $gw ([ a => $t ], [ b => $b ]) {
    ok($gw->[1]->wait_for_log(qr/\[notice\][^\n]*civicgate: redis \S+ connected again/,
        since => $mark->{ $gw->[0] }), "gateway $gw->[0]: "
        . '"connected again" at [notice]');
}

{
    my $f0 = fallbacks();
    my ($rs, $el) = alternate('/fl', "up2-$RUN", $K);
    admitted($rs, $el, $B + 1, 1,
        'Redis back: one limit over both gateways again');
    is_deeply(fallbacks(), $f0, 'no more fallbacks');
    my @k = $t->redis_scan_keys('cg:{l:*}:fl');
    is(scalar @k, 1, 'the decision is in Redis again (one cg:{l:...}:fl key)')
        or diag "@k";
}

###########################################################################
# a client leaving while its check waits on a stalled Redis

# a peer that accepts and never replies; with "setup", one that answers the
# connection setup (CLIENT SETNAME, SCRIPT LOAD, ...) and stalls at the
# first EVALSHA
sub stalled_peer {
    my ($port, $mode) = @_;
    require IO::Select;
    my $l = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
        LocalPort => $port, Listen => 16, ReuseAddr => 1, Proto => 'tcp')
        or die "listen $port: $!";
    my $sel = IO::Select->new($l);
    my (%buf, %stalled);
    while (1) {
        for my $c ($sel->can_read(1)) {
            if ($c == $l) {
                my $n = $l->accept or next;
                $sel->add($n);
                $buf{ fileno $n } = '';
                next;
            }
            my $fd = fileno $c;
            my $got = sysread($c, $buf{$fd}, 65536, length $buf{$fd});
            if (!$got) {
                $sel->remove($c);
                delete $buf{$fd};
                delete $stalled{$fd};
                close $c;
                next;
            }
            next if $mode ne 'setup' || $stalled{$fd};
            while ($buf{$fd} =~ /^\*(\d+)\r\n/) {
                my ($n, $pos, @args) = ($1, length("*$1\r\n"));
                my $ok = 1;
                for (1 .. $n) {
                    my $rest = substr($buf{$fd}, $pos);
                    unless ($rest =~ /^\$(\d+)\r\n/) { $ok = 0; last }
                    my $len = $1;
                    my $hl = length("\$$len\r\n");
                    if (length($rest) < $hl + $len + 2) { $ok = 0; last }
                    push @args, substr($rest, $hl, $len);
                    $pos += $hl + $len + 2;
                }
                last unless $ok;
                substr($buf{$fd}, 0, $pos, '');
                my $cmd = uc($args[0] // '');
                if ($cmd eq 'EVALSHA' || $cmd eq 'EVAL') {
                    # replies come in order: nothing more on this one
                    $stalled{$fd} = 1;
                    last;
                } elsif ($cmd eq 'SCRIPT') {
                    my $sha = sha1_hex($args[2] // '');
                    syswrite($c, "\$40\r\n$sha\r\n");
                } elsif ($cmd eq 'PING') {
                    syswrite($c, "+PONG\r\n");
                } else {
                    syswrite($c, "+OK\r\n");
                }
            }
        }
    }
}

for my $mode (qw(silent setup)) {
    my $c = $t->nginx("stall_$mode");
    my $sport = $t->port("stall_$mode");
    my $pid = $t->run_daemon(sub { stalled_peer($sport, $mode) });
    ok($t->wait_port($sport, 5), "$mode peer listening");

    $c->write_file('file.txt', "static\n");
    $c->write_nginx_conf(<<"EOF");
    civicgate_redis redis://127.0.0.1:$sport timeout=1s connect_timeout=1s;
    civicgate_limit_zone \$http_x_key zone=st:1m rate=2r/s store=redis on_error=local;

    server {
        listen 127.0.0.1:%%PORT_c_$mode%%;
        server_name localhost;

        add_header X-Limit-Status \$civicgate_limit_status always;

        location = /st {
            civicgate_limit zone=st burst=10 nodelay;
            alias %%TESTDIR%%/file.txt;
        }
        location = /free {
            alias %%TESTDIR%%/file.txt;
        }
    }
EOF
    $c->run;
    my $port = $t->port("c_$mode");
    my @w = $c->worker_pids;
    my $cmark = $c->log_mark;

    # 5 clients wait on the stalled peer; 3 leave after 100 ms
    local $SIG{PIPE} = 'IGNORE';
    my @s;
    for my $i (1 .. 5) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $port, Proto => 'tcp') or next;
        syswrite($s, "GET /st HTTP/1.1\r\nHost: localhost\r\n"
            . "Connection: close\r\nX-Key: st-$i-$RUN\r\n\r\n");
        push @s, $s;
    }
    is(scalar @s, 5, "$mode: 5 requests sent");
    sleep 0.1;
    my $t0 = time;
    close $_ for splice @s, 0, 3;

    # they are finalized (499) at once, while their commands still wait
    # (checked by order, not by time, so that it holds under valgrind too):
    # the reply or the timeout must then find no request
    my $early;
    my $finalized = $t->wait_until(sub {
            my $n = () = ($c->access_log =~ m{"GET /st HTTP/1\.1" 499 }g);
            return 0 if $n < 3;
            $early = $c->log_since($cmark) !~ /civicgate: redis \S+ timed out/;
            1 }, timeout => 5);
    ok($finalized && $early, "$mode: the 3 leaving clients' requests "
        . 'finalized (499) before the Redis timeout');

    # the two that stay get a decision once the command times out
    my @answers;
    for my $s (@s) {
        my $raw = '';
        eval {
            local $SIG{ALRM} = sub { die "timeout\n" };
            alarm 6;
            while (sysread($s, my $buf, 65536)) { $raw .= $buf }
            alarm 0;
        };
        alarm 0;
        push @answers, parse_response($raw);
        close $s;
    }
    my $waited = time - $t0;
    is(join(' ', map { $_->status } @answers), '200 200',
        "$mode: the clients that stayed got an answer (local fallback)");
    ok($waited < 4, sprintf('%s: after the Redis timeout (%.2f s)', $mode,
        $waited));
    ok($c->wait_for_log(qr/civicgate: redis \S+ timed out/, since => $cmark,
        timeout => 3), "$mode: \"timed out\" logged");

    # after the timeout and a reconnect attempt: still alive
    sleep 1.2;
    is($c->request('/free', port => $port)->status, 200,
        "$mode: the worker still serves");
    my $r = $c->request('/st', port => $port, headers => [ 'X-Key' => "after-$RUN" ],
        timeout => 6);
    is($r->status, 200, "$mode: and still decides limits (fallback)");
    is(join(' ', $c->worker_pids), join(' ', @w),
        "$mode: the same worker (no crash, no respawn)");
    unlike($c->log_since($cmark), qr/\[(?:alert|crit|emerg)\]|exited on signal/,
        "$mode: no alert, no crash");
    $c->stop;
    $t->stop_daemon($pid);
}

$t->done_testing;
