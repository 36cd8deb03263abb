#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Redis authentication and database selection: ACL user + password_file
# (AUTH user password), password only (AUTH password), a wrong password
# (setup refused and logged, requests unaffected, nothing written), and the
# database from the URL (/3) or db=N.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;

my $KEY = random_key_hex(32);
my $CGPW = 'secret-' . unpack('H*', random_bytes(6));
my $DEFPW = 'default-' . unpack('H*', random_bytes(6));

$t->run_redis(
    args => [ '--user', 'default', 'on', ">$DEFPW", '~*', '&*', '+@all',
              '--user', 'cg', 'on', ">$CGPW", '~*', '&*', '+@all' ],
    cli_args => [ '--user', 'cg', '--pass', $CGPW, '--no-auth-warning' ],
    auth => [ 'cg', $CGPW ],
);

{
    my $r = eval { $t->redis_query({ auth => undef }, 'XLEN', 'cg:events') };
    ok((defined $r && is_redis_error($r) && "$r" =~ /NOAUTH/)
        || ($@ && $@ =~ /NOAUTH/), 'Redis requires authentication')
        or diag($@ || $r);
}

# name => [ civicgate_redis arguments, password file text ]
my %cases = (
    acl     => [ 'redis://cg@127.0.0.1:%%REDIS_PORT%% password_file=%%TESTDIR%%/pw',
                 "$CGPW\n" ],
    plain   => [ 'redis://127.0.0.1:%%REDIS_PORT%% password_file=%%TESTDIR%%/pw',
                 "$DEFPW\nsecond line is ignored\n" ],
    wrong   => [ 'redis://cg@127.0.0.1:%%REDIS_PORT%% password_file=%%TESTDIR%%/pw',
                 "not-$CGPW\n" ],
    db3     => [ 'redis://cg@127.0.0.1:%%REDIS_PORT%%/3 password_file=%%TESTDIR%%/pw',
                 "$CGPW\n" ],
    dbparam => [ 'redis://cg@127.0.0.1:%%REDIS_PORT%% db=5 password_file=%%TESTDIR%%/pw',
                 "$CGPW\n" ],
);

my %inst;
for my $name (sort keys %cases) {
    my $n = $t->nginx($name);
    $n->write_secret_file('keys', [ [ k1 => $KEY ] ]);
    $n->write_file('pw', $cases{$name}[1], 0644);
    $n->write_nginx_conf(<<"EOF");
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis $cases{$name}[0];

    server {
        listen 127.0.0.1:%%PORT_$name%%;
        server_name localhost;
        location /e {
            civicgate_journey on;
            civicgate_channel web;
            civicgate_service svc-$name;
            return 200 "ok\\n";
        }
        location = /metrics {
            civicgate_metrics;
        }
    }
EOF
    $n->run;
    $inst{$name} = $n;
}

# 5 requests through each gateway
my %sent;
for my $name (sort keys %inst) {
    my $bad = 0;
    for (1 .. 5) {
        my $r = $inst{$name}->request('/e', port => $t->port($name));
        $bad++ unless $r->status == 200;
        push @{ $sent{$name} }, $r->header('X-Journey-ID') // '';
    }
    is($bad, 0, "$name: 5 requests answered 200");
}

sub service_events {
    my ($db, $name) = @_;
    my $g = $t->redis_stream({ db => $db }, 'cg:events');
    return grep { ($_->{f}{service} // '') eq "svc-$name" } @$g;
}

sub wait_events {
    my ($db, $name, $n) = @_;
    return $t->wait_until(sub { service_events($db, $name) >= $n },
        timeout => 5);
}

sub gateway_conns {
    my ($name) = @_;
    my %w = map { ("civicgate-$_" => 1) } $inst{$name}->worker_pids;
    return grep { $w{ $_->{name} // '' } } $t->redis_clients;
}

# ACL user: AUTH cg password
ok(wait_events(0, 'acl', 5), 'acl: events written');
is(scalar(service_events(0, 'acl')), 5, 'acl: 5 events in db 0');
{
    my @c = gateway_conns('acl');
    is(scalar @c, 1, 'acl: one connection');
    is($c[0]{user}, 'cg', 'acl: authenticated as user cg');
    is($c[0]{db}, 0, 'acl: db 0');
}
is(metric($inst{acl}->metrics(port => $t->port('acl')),
    'civicgate_events_total', result => 'written'), 5,
    'acl: events_total{result=written} = 5');

# password only: AUTH password (the default user), first line of the file
ok(wait_events(0, 'plain', 5), 'password only: events written');
{
    my @c = gateway_conns('plain');
    is(scalar @c, 1, 'password only: one connection');
    is($c[0]{user}, 'default', 'password only: authenticated as default');
}

# database from the URL and from db=
ok(wait_events(3, 'db3', 5), '/3: events written to db 3');
is(scalar(service_events(0, 'db3')), 0, '/3: nothing in db 0');
is(scalar($t->redis_cmd('-n', 3, 'XLEN', 'cg:events')), 5,
    '/3: redis-cli -n 3 XLEN cg:events = 5');
{
    my @c = gateway_conns('db3');
    is($c[0]{db}, 3, '/3: the connection uses db 3');
    my $j = $sent{db3}[0];
    is($t->redis_query({ db => 3 }, 'EXISTS', "cg:{j:$j}:timeline"), 1,
        '/3: journey keys in db 3');
    is($t->redis_query('EXISTS', "cg:{j:$j}:timeline"), 0,
        '/3: no journey keys in db 0');
}
ok(wait_events(5, 'dbparam', 5), 'db=5: events written to db 5');
is(scalar(service_events(0, 'dbparam')), 0, 'db=5: nothing in db 0');

# wrong password: refused setup, logged with the error, nothing written
{
    my $w = $inst{wrong};
    ok($w->wait_for_log(qr/civicgate: redis .*refused setup.*WRONGPASS/,
        timeout => 3), 'wrong password: error log has the refused setup with '
        . 'WRONGPASS') or diag $w->error_log;
    my ($line) = grep { /refused setup/ } split /\n/, $w->error_log;
    like($line // '', qr/\[error\]/, 'wrong password: logged at [error]');
    my $r = $w->request('/e', port => $t->port('wrong'));
    is($r->status, 200, 'wrong password: requests still answered');
    push @{ $sent{wrong} }, $r->header('X-Journey-ID') // '';
    is(scalar(gateway_conns('wrong')), 0, 'wrong password: no connection stays');
    my $found = 0;
    for my $db (0, 3, 5) {
        $found += service_events($db, 'wrong');
        for my $j (@{ $sent{wrong} }) {
            $found += $t->redis_query({ db => $db }, 'EXISTS',
                "cg:{j:$j}:timeline");
        }
    }
    is($found, 0, 'wrong password: nothing written');
    my $n = $t->wait_until(sub {
        my @l = grep { /civicgate: redis / } split /\n/, $w->error_log;
        @l >= 3 ? scalar @l : 0;
    }, timeout => 5, interval => 0.1);
    ok($n, 'wrong password: repeated attempts are refused (logged)');
    my @l = grep { /civicgate: redis / } split /\n/, $w->error_log;
    is(scalar(grep { /\[error\]/ } @l), 1, 'wrong password: logged once at '
        . '[error], then at [info] (' . scalar(@l) . ' lines)')
        or diag join "\n", @l[0 .. ($#l > 5 ? 5 : $#l)];
    my $m = $w->metrics(port => $t->port('wrong'));
    is(metric($m, 'civicgate_events_total', result => 'written'), 0,
        'wrong password: events_total{result=written} = 0');
}

$t->done_testing;
