#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# mode=sentinel checks what the server the Sentinels name is: one Sentinel
# monitors a lone server.  Made a replica under load (REPLICAOF), the
# server answers writes -READONLY: the gateway drops the connection, asks
# the Sentinel again, and does not use the server while its ROLE is not
# "master"; the events wait in the spool.  Made master again (REPLICAOF
# NO ONE), it gets them all.  A Sentinel that does not know the master
# name is logged and asked again.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $top = $t->topdir;

my $KEY = random_key_hex(32);
$t->write_secret_file("$top/keys", [ [ k1 => $KEY ] ]);

my $server = (grep { -x } map { "$_/redis-server" }
    split(/:/, $ENV{PATH} // ''), '/usr/bin')[0];
$server = $ENV{CIVICGATE_REDIS_SERVER} if $ENV{CIVICGATE_REDIS_SERVER};

my $PM = $t->port('lone');
my $PS = $t->port('sentinel');
my $PD = $t->port('dead');

$t->run_daemon_logged("$top/lone.log", $server, '--port', $PM, '--bind',
    '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', $top,
    '--protected-mode', 'no');
$t->write_file("$top/sentinel.conf", join "\n", "port $PS",
    'bind 127.0.0.1', 'protected-mode no', "dir $top",
    "sentinel monitor lone 127.0.0.1 $PM 1",
    'sentinel down-after-milliseconds lone 60000', '');
$t->run_daemon_logged("$top/sentinel.log", $server, "$top/sentinel.conf",
    '--sentinel');

ok($t->wait_until(sub {
    my $r = eval { $t->redis_query({ port => $PS },
        'SENTINEL', 'get-master-addr-by-name', 'lone') };
    ref $r eq 'ARRAY' && $r->[1] == $PM }, timeout => 10),
    'the Sentinel names the lone server');

$t->{ctx}{redis} = { port => 'lone' };

my $CONF = <<'EOF';
    civicgate_secret_file %%TOPDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%PORT_sentinel%%
                    mode=sentinel master=@MASTER@
                    timeout=300ms connect_timeout=300ms;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        civicgate_journey on;
        location /ev {
            civicgate_service ev;
            return 200 "ok\n";
        }
        location = /metrics {
            civicgate_events off;
            civicgate_metrics;
        }
    }
EOF

# an unknown master's name first
sub conf_master {
    my ($name) = @_;
    (my $c = $CONF) =~ s/\@MASTER\@/$name/;
    $t->write_nginx_conf($c);
}

sub events { $t->redis_query('XLEN', 'cg:events') // 0 }

conf_master('nobody');
$t->run;
{
    my $s = "127.0.0.1:$PS";
    ok($t->wait_for_log(qr/\[error\].*Sentinel redis:\/\/\Q$s at $s\E does not/
        . qr/ know master "nobody"/, timeout => 5),
        'a Sentinel without the master: logged');
    is($t->request('/ev')->status, 200, 'requests are answered meanwhile');
    is(events(), 0, 'nothing written');
}

conf_master('lone');
my $mark = $t->log_mark;
$t->reload;
ok($t->wait_until(sub { $t->request('/ev'); events() >= 1 }, timeout => 5),
    'after a reload with the right name, events are written');

{
    my $job = $t->start_load(clients => 1, requests => 80, interval => 0.02,
        path => '/ev', timeout => 5);
    sleep 0.4;
    $mark = $t->log_mark;
    $t->redis_query('REPLICAOF', '127.0.0.1', $PD);
    my $at = "redis master \"lone\" at 127.0.0.1:$PM";
    ok($t->wait_for_log(qr/\[error\].*\Q$at is no longer the master\E/,
        since => $mark, timeout => 5), 'a -READONLY answer is logged');
    ok($t->wait_for_log(qr/\Q$at is not the master (role "slave")\E/,
        since => $mark, timeout => 5),
        'the server is not used while its ROLE is "slave"');
    my $during = events();
    sleep 0.5;
    is(events(), $during, 'nothing written to it meanwhile');
    $t->redis_query('REPLICAOF', 'NO', 'ONE');
    my $res = $t->wait_load($job, timeout => 30);
    is($res->{answered}, 80, 'every request answered 200');
    cmp_ok($res->{max_elapsed}, '<', 1, 'none waited for Redis');
    my %sent = map { $_->{journey} => 0 } @{ $res->{results} };
    my $all = sub {
        $_ = 0 for values %sent;
        for my $e (@{ $t->redis_stream('cg:events') }) {
            $sent{ $e->{f}{journey} }++ if exists $sent{ $e->{f}{journey} };
        }
        !grep { $_ == 0 } values %sent;
    };
    ok($t->wait_until($all, timeout => 10),
        'master again: the spooled events are written');
    is(scalar(grep { $_ != 1 } values %sent), 0, 'each of the 80 once');
}

$t->done_testing;
