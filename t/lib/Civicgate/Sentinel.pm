package Civicgate::Sentinel;

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

=head1 NAME

Civicgate::Sentinel - a Redis Sentinel set on loopback for the tests

=head1 SYNOPSIS

    use Civicgate::Test qw(:all);
    use Civicgate::Sentinel;

    my $t = Civicgate::Test->new;
    my $S = Civicgate::Sentinel->start($t, name => 'cg');
    # %%PORT_sentinel1%% .. %%PORT_sentinel3%% in nginx.conf
    my $port = $S->master_port;           # as the Sentinels say
    $S->query($port, 'XLEN', 'cg:events');
    $S->failover;                         # SENTINEL FAILOVER, wait for it
    $S->kill_master;                      # SIGKILL, wait for the switch

=head1 DESCRIPTION

Starts two C<redis-server>s, the second a replica of the first
(C<replicaof>), and three C<redis-server --sentinel> monitoring the first
with a quorum of 2, C<down-after-milliseconds> (default 1000) and
C<failover-timeout> (default 3000).  Options: C<server_args> (more
arguments for both servers), C<auth> (the password of the servers'
default user: set as C<requirepass>, C<masterauth> and the Sentinels'
C<auth-pass>, and used by C<query> and the context's Redis), and
C<sentinel_lines> (more lines for each Sentinel's configuration).  Every
process is a daemon of the
test context: stopped by pid when the test ends.  Ports are the context's
C<sentinel_a>, C<sentinel_b> (the servers) and C<sentinel1> ..
C<sentinel3>.  C<start> returns once the replica is in sync and every
Sentinel knows the replica and the two other Sentinels.

The context's Redis (C<redis_query>, C<redis_stream>, C<redis_clients>,
...) is pointed at the current master: C<start>, C<failover> and
C<kill_master> keep it so.

=head1 METHODS

    $S->master_port             the master's port, asked of a Sentinel
    $S->sentinel_ports          the three Sentinels' ports
    $S->server_ports            the two servers' ports
    $S->query($port, @cmd)      one command to a port, its reply
    $S->failover(%o)            SENTINEL FAILOVER through Sentinel o{via}
                                (index, default 0); returns the seconds until
                                the Sentinels name the new master
    $S->kill_master(%o)         SIGKILL of the master; returns the seconds
                                until the Sentinels name the new one
    $S->restart_old(%o)         starts the killed server again (it comes
                                back as a replica)

=cut

use strict;
use warnings;

use Carp qw(croak);
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);
use Civicgate::Test ();

my $REDIS_SERVER = _which('redis-server');

sub _which {
    my ($prog) = @_;
    return $ENV{CIVICGATE_REDIS_SERVER} if $ENV{CIVICGATE_REDIS_SERVER};
    for my $d (split(/:/, $ENV{PATH} || ''), qw(/usr/local/bin /usr/bin)) {
        return "$d/$prog" if length $d && -x "$d/$prog";
    }
    return undef;
}

sub start {
    my ($class, $t, %o) = @_;
    croak 'redis-server not found' unless $REDIS_SERVER;
    my $self = bless {
        t => $t,
        name => $o{name} // 'cg',
        down_after => $o{down_after} // 1000,
        failover_timeout => $o{failover_timeout} // 3000,
        servers => {},
        sentinels => [],
        server_args => $o{server_args} // [],
        auth => $o{auth},
    }, $class;
    my $top = $t->topdir;

    my $a = $t->port('sentinel_a');
    my $b = $t->port('sentinel_b');
    $self->_server($a);
    $self->_server($b, '--replicaof', '127.0.0.1', $a);

    for my $i (1 .. 3) {
        my $p = $t->port("sentinel$i");
        my $conf = "$top/sentinel$i.conf";
        open my $fh, '>', $conf or croak "$conf: $!";
        print $fh join "\n", "port $p", 'bind 127.0.0.1',
            'protected-mode no', "dir $top",
            "sentinel monitor $self->{name} 127.0.0.1 $a 2",
            "sentinel down-after-milliseconds $self->{name} "
                . $self->{down_after},
            "sentinel failover-timeout $self->{name} "
                . $self->{failover_timeout},
            (defined $o{auth}
                ? ("sentinel auth-pass $self->{name} $o{auth}") : ()),
            @{ $o{sentinel_lines} // [] }, '';
        close $fh;
        push @{ $self->{sentinels} }, { port => $p,
            pid => $t->run_daemon_logged("$top/sentinel$i.log",
                $REDIS_SERVER, $conf, '--sentinel') };
    }

    $self->_wait_ready($a, $b);
    $self->_point($a);
    return $self;
}

sub _server {
    my ($self, $port, @args) = @_;
    my $t = $self->{t};
    my $top = $t->topdir;
    my $pid = $t->run_daemon_logged("$top/redis-$port.log", $REDIS_SERVER,
        '--port', $port, '--bind', '127.0.0.1', '--save', '',
        '--appendonly', 'no', '--dir', $top, '--protected-mode', 'no',
        '--daemonize', 'no', '--dbfilename', "dump-$port.rdb",
        (defined $self->{auth} ? ('--requirepass', $self->{auth},
            '--masterauth', $self->{auth}) : ()),
        @{ $self->{server_args} }, @args);
    $self->{servers}{$port} = $pid;
    return $pid;
}

sub _wait_ready {
    my ($self, $a, $b) = @_;
    my $t = $self->{t};
    my $n = $self->{name};
    my $ok = $t->wait_until(sub {
        my $info = $self->query($b, 'INFO', 'replication') // '';
        return 0 unless !ref $info && $info =~ /master_link_status:up/;
        for my $s (@{ $self->{sentinels} }) {
            my $r = $self->query($s->{port}, 'SENTINEL', 'replicas', $n);
            return 0 unless ref $r eq 'ARRAY' && @$r == 1;
            my $o = $self->query($s->{port}, 'SENTINEL', 'sentinels', $n);
            return 0 unless ref $o eq 'ARRAY' && @$o == 2;
        }
        return 1;
    }, timeout => 20, interval => 0.1);
    croak 'the Sentinel set did not come up' unless $ok;
}

# the context's Redis is the master
sub _point {
    my ($self, $port) = @_;
    my $t = $self->{t};
    my ($name) = $port == $t->port('sentinel_a') ? 'sentinel_a' : 'sentinel_b';
    $t->{ctx}{redis} = { port => $name, pid => undef, args => [],
        cli_args => [],
        (defined $self->{auth} ? (auth => [ $self->{auth} ]) : ()) };
    $self->{master} = $port;
}

sub sentinel_ports { map { $_->{port} } @{ $_[0]{sentinels} } }
sub server_ports { sort { $a <=> $b } keys %{ $_[0]{servers} } }

sub query {
    my ($self, $port, @cmd) = @_;
    my $server = exists $self->{servers}{$port} && defined $self->{auth};
    my $r = eval { $self->{t}->redis_query({ port => $port, timeout => 3,
        ($server ? (auth => [ $self->{auth} ]) : (auth => undef)) }, @cmd) };
    return $r;
}

sub master_port {
    my ($self, $via) = @_;
    my @s = $self->sentinel_ports;
    my $r = $self->query($s[$via // 0], 'SENTINEL',
        'get-master-addr-by-name', $self->{name});
    return ref $r eq 'ARRAY' ? $r->[1] : undef;
}

sub _wait_switch {
    my ($self, $old, $t0, $timeout) = @_;
    my $t = $self->{t};
    my $new;
    $t->wait_until(sub {
        for my $i (0 .. 2) {
            my $p = $self->master_port($i) // return 0;
            return 0 if $p == $old;
        }
        $new = $self->master_port(0);
        my $role = $self->query($new, 'ROLE');
        return ref $role eq 'ARRAY' && $role->[0] eq 'master';
    }, timeout => $timeout // 15, interval => 0.05)
        or croak "no new master after " . (time - $t0) . ' s';
    $self->_point($new);
    return time - $t0;
}

sub failover {
    my ($self, %o) = @_;
    my $old = $self->{master};
    my @s = $self->sentinel_ports;
    my $t0 = time;
    my $r = $self->query($s[$o{via} // 0], 'SENTINEL', 'FAILOVER',
        $self->{name});
    croak 'SENTINEL FAILOVER: ' . (ref $r ? $r->{message} // '?' : $r // '?')
        unless defined $r && !ref $r && $r eq 'OK';
    return $self->_wait_switch($old, $t0, $o{timeout});
}

sub kill_master {
    my ($self, %o) = @_;
    my $old = $self->{master};
    my $pid = $self->{servers}{$old};
    my $t0 = time;
    kill 'KILL', $pid;
    waitpid($pid, 0);
    $self->{t}->forget_daemon($pid);
    $self->{killed} = $old;
    return $self->_wait_switch($old, $t0, $o{timeout});
}

sub restart_old {
    my ($self) = @_;
    my $port = $self->{killed} or return;
    delete $self->{killed};
    return $self->_server($port);
}

1;
