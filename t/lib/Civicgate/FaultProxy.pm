package Civicgate::FaultProxy;

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

=head1 NAME

Civicgate::FaultProxy - a TCP proxy between nginx and Redis that injects
faults, switched at run time

=head1 SYNOPSIS

    use Civicgate::Test qw(:all);
    use Civicgate::FaultProxy;

    my $t = Civicgate::Test->new;
    $t->run_redis(port => 'real');         # redis_query & co. go there
    my $p = Civicgate::FaultProxy->start($t,
        listen => $t->port('redis'),       # %%REDIS_PORT%% is the proxy
        to     => $t->redis_port);
    ...
    $p->mode('blackhole');                 # in effect when it returns
    $p->mode('delay', 500);
    $p->mode('pass');
    $p->stop;                              # or left to done_testing

=head1 DESCRIPTION

A child process (tracked by pid like every daemon of Civicgate::Test, so
stopped when the test ends) listening on 127.0.0.1; each connection it
accepts is forwarded to 127.0.0.1:C<to>.  One select loop, non-blocking
sockets.  It is driven through a UNIX socket in the test directory: one
line per command, answered with one line, so a mode is in effect for
every connection when C<mode> returns.

Modes (the direction "replies" is Redis to nginx):

    pass              forward both ways as data arrives
    delay MS          every chunk, both ways, is forwarded MS ms after it
                      arrived (order kept)
    blackhole         existing and new connections stay open and silent:
                      nothing is forwarded either way, new connections are
                      accepted but never connected to Redis.  A connection
                      blackholed once stays so (its stream is broken),
                      also after the mode changes
    reset             every connection is closed with an RST (SO_LINGER 0)
                      at once, and every new one as soon as accepted
    truncate close    the next reply chunk of each connection is cut in
    truncate stall    the middle (its first half forwarded, rounded down,
                      the rest never): then the connection is closed
                      (close), or left open and silent for good (stall)
    drip MS           replies are forwarded one byte every MS ms;
                      requests pass

Methods:

    Civicgate::FaultProxy->start($t, listen => PORT, to => PORT)
    $p->mode($name [, $arg])    croaks unless the proxy says OK
    $p->stats                   { accepted => N, open => N, mode => '...' }
                                (open: connections from nginx not closed,
                                blackholed ones included)
    $p->wait_connections($n [, $timeout = 5])
                                until at least $n connections are open
    $p->port, $p->pid
    $p->stop

Exported on request:

    @FAULTS          the faults every feature is tested against: array refs
                     [ label, mode, arg ] (delay 500 ms, blackhole, reset,
                     truncate close, truncate stall, drip 100 ms); with
                     timeout=200ms each of them makes a command fail
    timed_request($t, $path, %o)
                     $t->request with a 5 s timeout: (response, seconds)

=cut

use strict;
use warnings;

use Carp qw(croak);
use IO::Select;
use IO::Socket::INET;
use IO::Socket::UNIX;
use Socket qw(SOL_SOCKET SO_LINGER SOCK_STREAM);
use Time::HiRes qw(time sleep);

use Exporter qw(import);

our @EXPORT_OK = qw(@FAULTS timed_request);

our @FAULTS = (
    [ 'delay 500ms',    'delay',    500 ],
    [ 'blackhole',      'blackhole'       ],
    [ 'reset',          'reset'           ],
    [ 'truncate close', 'truncate', 'close' ],
    [ 'truncate stall', 'truncate', 'stall' ],
    [ 'drip 100ms',     'drip',     100 ],
);

my $NPROXY = 0;

sub timed_request {
    my ($t, $path, %o) = @_;
    my $t0 = time;
    my $r = $t->request($path, timeout => 5, %o);
    return ($r, time - $t0);
}

sub start {
    my ($class, $t, %o) = @_;
    my $listen = $o{listen} // croak 'listen => PORT needed';
    my $to = $o{to} // croak 'to => PORT needed';
    my $ctl = $t->topdir . '/faultproxy-' . ++$NPROXY . '.sock';
    unlink $ctl;
    my $pid = $t->run_daemon(sub { _serve($listen, $to, $ctl) });
    my $self = bless { t => $t, pid => $pid, port => $listen, ctl => $ctl },
        $class;
    my $end = time + 10;
    until (-S $ctl && $t->wait_port($listen, 0.2)) {
        croak "fault proxy on $listen did not start" if time > $end;
        sleep 0.05;
    }
    return $self;
}

sub port { $_[0]{port} }
sub pid  { $_[0]{pid} }

sub stop {
    my ($self) = @_;
    $self->{t}->stop_daemon($self->{pid}) if $self->{pid};
    $self->{pid} = undef;
}

sub _command {
    my ($self, $line) = @_;
    my $s = IO::Socket::UNIX->new(Peer => $self->{ctl}, Type => SOCK_STREAM)
        or croak "fault proxy control $self->{ctl}: $!";
    print $s "$line\n";
    my $reply;
    my $ok = eval {
        local $SIG{ALRM} = sub { die "timeout\n" };
        alarm 5;
        $reply = <$s>;
        alarm 0;
        1;
    };
    alarm 0;
    close $s;
    croak "fault proxy: no answer to '$line'" unless $ok && defined $reply;
    chomp $reply;
    return $reply;
}

sub mode {
    my ($self, @m) = @_;
    my $r = $self->_command(join ' ', 'mode', @m);
    croak "fault proxy: mode @m: $r" unless $r =~ /^OK\b/;
    return 1;
}

sub stats {
    my ($self) = @_;
    my $r = $self->_command('stats');
    return { map { split /=/, $_, 2 } grep { /=/ } split / /, $r };
}

sub wait_connections {
    my ($self, $n, $timeout) = @_;
    my $end = time + ($timeout // 5);
    while (1) {
        return 1 if $self->stats->{open} >= $n;
        return 0 if time >= $end;
        sleep 0.05;
    }
}

###########################################################################
# the proxy process

my %MODES = (pass => 0, delay => 1, blackhole => 0, reset => 0,
    truncate => 1, drip => 1);

sub _serve {
    my ($listen, $to, $ctl) = @_;
    local $SIG{PIPE} = 'IGNORE';
    my $l = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
        LocalPort => $listen, Listen => 128, ReuseAddr => 1)
        or die "listen $listen: $!\n";
    my $c = IO::Socket::UNIX->new(Local => $ctl, Type => SOCK_STREAM,
        Listen => 16) or die "listen $ctl: $!\n";
    $_->blocking(0) for $l, $c;
    my $st = { l => $l, ctl => $c, to => $to, conns => {}, mode => 'pass',
        arg => undef, accepted => 0 };
    _loop($st) while 1;
}

sub _loop {
    my ($st) = @_;
    my $now = time;
    my ($rs, $ws) = (IO::Select->new($st->{l}, $st->{ctl}), IO::Select->new);
    my $wake = $now + 0.05;
    for my $cn (values %{ $st->{conns} }) {
        my $due = _schedule($st, $cn, $now);
        $wake = $due if defined $due && $due < $wake;
        for my $side (qw(c s)) {
            next unless $cn->{$side};
            $rs->add($cn->{$side});
            $ws->add($cn->{$side}) if length $cn->{out}{$side};
        }
    }
    my $left = $wake - time;
    my ($r, $w) = IO::Select->select($rs, $ws, undef, $left > 0 ? $left : 0);
    for my $fh (@{ $r || [] }) {
        next unless defined fileno $fh;    # closed by an earlier event
        if ($fh == $st->{l}) {
            _accept($st);
        } elsif ($fh == $st->{ctl}) {
            _control($st);
        } else {
            _read($st, $fh);
        }
    }
    for my $fh (@{ $w || [] }) {
        next unless defined fileno $fh;
        my $cn = $st->{byfd}{ fileno $fh } or next;
        _flush($st, $cn);
    }
}

# moves the chunks that are due into the output buffers; returns when the
# next one is due
sub _schedule {
    my ($st, $cn, $now) = @_;
    my $next;
    for my $side (qw(c s)) {
        my $q = $cn->{q}{$side};
        while (@$q && $q->[0][0] <= $now) {
            $cn->{out}{$side} .= (shift @$q)->[1];
        }
        $next = $q->[0][0] if @$q && (!defined $next || $q->[0][0] < $next);
    }
    if (length $cn->{drip}) {
        if ($st->{mode} ne 'drip') {
            $cn->{out}{c} .= $cn->{drip};
            $cn->{drip} = '';
        } elsif ($now >= $cn->{drip_at}) {
            $cn->{out}{c} .= substr($cn->{drip}, 0, 1, '');
            $cn->{drip_at} = $now + $st->{arg} / 1000;
        }
        $next = $cn->{drip_at}
            if length $cn->{drip} && (!defined $next || $cn->{drip_at} < $next);
    }
    _flush($st, $cn) if length $cn->{out}{c} || length $cn->{out}{s};
    return $next;
}

sub _accept {
    my ($st) = @_;
    my $c = $st->{l}->accept or return;
    $st->{accepted}++;
    $c->blocking(0);
    if ($st->{mode} eq 'reset') {
        _rst($c);
        return;
    }
    my $cn = { c => $c, s => undef, dead => 0, drip => '', drip_at => 0,
        cut => 0, q => { c => [], s => [] }, out => { c => '', s => '' } };
    if ($st->{mode} eq 'blackhole') {
        $cn->{dead} = 1;
    } else {
        # loopback: connecting is immediate, or refused when Redis is down
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $st->{to}, Proto => 'tcp', Timeout => 1);
        unless ($s) {
            close $c;
            return;
        }
        $s->blocking(0);
        $cn->{s} = $s;
        $st->{byfd}{ fileno $s } = $cn;
    }
    $st->{byfd}{ fileno $c } = $cn;
    $st->{conns}{ fileno $c } = $cn;
}

sub _rst {
    my ($sock) = @_;
    setsockopt($sock, SOL_SOCKET, SO_LINGER, pack('ii', 1, 0));
    close $sock;
}

sub _close {
    my ($st, $cn, $rst) = @_;
    for my $side (qw(c s)) {
        my $fh = $cn->{$side} or next;
        delete $st->{byfd}{ fileno $fh };
        delete $st->{conns}{ fileno $fh } if $side eq 'c';
        if ($rst) { _rst($fh) } else { close $fh }
        $cn->{$side} = undef;
    }
}

sub _read {
    my ($st, $fh) = @_;
    my $cn = $st->{byfd}{ fileno $fh } or return;
    my $from = ($cn->{c} && $fh == $cn->{c}) ? 'c' : 's';
    my $n = sysread($fh, my $buf, 65536);
    return if !defined $n && ($!{EAGAIN} || $!{EWOULDBLOCK});
    if (!$n) {
        _close($st, $cn, 0);
        return;
    }
    return if $cn->{dead};
    my ($mode, $arg, $now) = ($st->{mode}, $st->{arg}, time);
    if ($mode eq 'blackhole') {
        _blackhole($cn);
        return;
    }
    if ($from eq 'c') {
        push @{ $cn->{q}{s} }, [ $mode eq 'delay' ? $now + $arg / 1000 : 0,
            $buf ];
        return;
    }
    if ($mode eq 'drip') {
        $cn->{drip_at} = $now unless length $cn->{drip};
        $cn->{drip} .= $buf;
    } elsif ($mode eq 'truncate') {
        _truncate($st, $cn, $buf);
    } else {
        push @{ $cn->{q}{c} }, [ $mode eq 'delay' ? $now + $arg / 1000 : 0,
            $buf ];
    }
}

# forwards the first half of a reply chunk, then closes or goes silent
sub _truncate {
    my ($st, $cn, $buf) = @_;
    my $keep = length($buf) > 1 ? int(length($buf) / 2) : 0;
    $cn->{out}{c} .= join '', map { $_->[1] } @{ $cn->{q}{c} };
    $cn->{q}{c} = [];
    $cn->{out}{c} .= $cn->{drip} . substr($buf, 0, $keep);
    $cn->{drip} = '';
    _flush($st, $cn);
    if ($st->{arg} eq 'close') {
        _close($st, $cn, 0);
    } else {
        _blackhole($cn);
    }
}

sub _blackhole {
    my ($cn) = @_;
    $cn->{dead} = 1;
    $cn->{q} = { c => [], s => [] };
    $cn->{out} = { c => '', s => '' };
    $cn->{drip} = '';
}

sub _flush {
    my ($st, $cn) = @_;
    for my $side (qw(c s)) {
        my $fh = $cn->{$side} or next;
        next unless length $cn->{out}{$side};
        my $n = syswrite($fh, $cn->{out}{$side});
        if (defined $n) {
            substr($cn->{out}{$side}, 0, $n, '');
        } elsif (!$!{EAGAIN} && !$!{EWOULDBLOCK}) {
            _close($st, $cn, 0);
            return;
        }
    }
}

sub _control {
    my ($st) = @_;
    my $s = $st->{ctl}->accept or return;
    $s->blocking(1);
    my $line = <$s> // '';
    chomp $line;
    my $reply;
    if ($line eq 'stats') {
        $reply = sprintf 'OK accepted=%d open=%d mode=%s', $st->{accepted},
            scalar(keys %{ $st->{conns} }), $st->{mode};
    } elsif ($line =~ /^mode (\w+)(?: (\w+))?$/ && exists $MODES{$1}
        && ($MODES{$1} xor !defined $2))
    {
        $reply = _set_mode($st, $1, $2);
    } else {
        $reply = "ERR bad command: $line";
    }
    print $s "$reply\n";
    close $s;
}

sub _set_mode {
    my ($st, $mode, $arg) = @_;
    return "ERR $mode needs a number"
        if ($mode eq 'delay' || $mode eq 'drip') && $arg !~ /^\d+$/;
    return 'ERR truncate close or stall'
        if $mode eq 'truncate' && $arg !~ /^(?:close|stall)$/;
    ($st->{mode}, $st->{arg}) = ($mode, $arg);
    for my $cn (values %{ $st->{conns} }) {
        if ($mode eq 'reset') {
            _close($st, $cn, 1);
        } elsif ($mode eq 'blackhole') {
            _blackhole($cn);
        }
    }
    return 'OK ' . $mode . (defined $arg ? " $arg" : '');
}

1;
