#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# mode=sentinel with users and passwords on both sides: the servers
# require a password and the gateway connects as its own least-privilege
# ACL user (user=, password_file=; the ACL of docs/security.md with +role);
# the Sentinels have the "watcher" user of docs/redis-modes.md, which the
# gateway authenticates as (sentinel_user=, sentinel_password_file=).
# A reload moves every connection to the new workers.  A wrong Sentinel
# password is refused, logged, and requests are still answered, their
# events kept in the spool.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);
use Civicgate::Sentinel;

my $t = Civicgate::Test->new;
my $top = $t->topdir;

my $KEY = random_key_hex(32);
$t->write_secret_file("$top/keys", [ [ k1 => $KEY ] ]);
$t->write_file("$top/gw.pw", "gw-secret\n");
$t->write_file("$top/watch.pw", "watch-secret\n");
$t->write_file("$top/wrong.pw", "not-it\n");

# the gateway's ACL of docs/security.md, and +role for mode=sentinel
sub doc_acl {
    my ($file, $re) = @_;
    open my $fh, '<', "$FindBin::Bin/../docs/$file" or die "$file: $!";
    my $text = do { local $/; <$fh> };
    my ($acl) = $text =~ $re or die "no ACL in docs/$file";
    $acl =~ s/\s+/ /g;
    return split ' ', $acl;
}

my @gw = doc_acl('security.md', qr/ACL SETUSER civicgate on >PASSWORD (.*?)\n\s*```/s);
my @watcher = doc_acl('redis-modes.md', qr/ACL SETUSER watcher on >PASSWORD (.*?)\n```/s);
ok(scalar(@gw) > 10 && scalar(@watcher) > 4, 'the ACLs of the docs found');

my $S = Civicgate::Sentinel->start($t, name => 'cg', auth => 'data-secret',
    server_args => [ '--user', 'gw', 'on', '>gw-secret', @gw, '+role' ],
    sentinel_lines => [ "user watcher on >watch-secret @watcher" ]);
my @SP = $S->sentinel_ports;

my $SEN = join ' ', map { "redis://127.0.0.1:%%PORT_sentinel$_%%" } 1 .. 3;

sub conf {
    my ($n, $port, $spw) = @_;
    $n->write_nginx_conf(<<"EOF", worker_processes => 2);
    civicgate_secret_file %%TOPDIR%%/keys;
    civicgate_redis $SEN mode=sentinel master=cg
                    user=gw password_file=%%TOPDIR%%/gw.pw
                    sentinel_user=watcher
                    sentinel_password_file=%%TOPDIR%%/$spw
                    timeout=300ms connect_timeout=300ms;

    server {
        listen 127.0.0.1:%%PORT_$port%%;
        civicgate_journey on;
        location /ev {
            civicgate_service ev;
            return 200 "ok\\n";
        }
        location = /metrics {
            civicgate_events off;
            civicgate_metrics;
        }
    }
EOF
}

# the workers' connections: [user, count] per server, Sentinels summed
sub clients_of {
    my ($port, @pids) = @_;
    my %want = map { ("civicgate-$_" => 1) } @pids;
    my @c = eval { $t->redis_clients({ port => $port,
        (exists $S->{servers}{$port} ? () : (auth => undef)) }) };
    return grep { $want{ $_->{name} // '' } } @c;
}

sub settled {
    my @w = $t->worker_pids;
    return 0 unless @w == 2;
    my @m = clients_of($S->master_port, @w);
    my @s = map { clients_of($_, @w) } @SP;
    return 0 unless @m == 2 && @s == 8;
    return join(' ', sort map { $_->{user} } @m) eq 'gw gw'
        && !grep { $_->{user} ne 'watcher' } @s;
}

conf($t, 0, 'watch.pw');
$t->run;

ok($t->wait_until(\&settled, timeout => 5), 'each worker: its command'
    . ' connection to the master as "gw", 4 to the Sentinels as "watcher"');
is($t->request('/ev')->status, 200, 'a request');
ok($t->wait_until(sub { ($t->redis_query('XLEN', 'cg:events') // 0) >= 1 }),
    'its event written on the master by the least-privilege user');

{
    my @old = $t->worker_pids;
    $t->reload;
    ok($t->wait_until(sub {
        my @w = $t->worker_pids;
        !grep { my $o = $_; grep { $_ == $o } @w } @old and settled();
    }, timeout => 10), 'reload: the new workers have every connection');
    my @left = (clients_of($S->master_port, @old),
        map { clients_of($_, @old) } @SP);
    ok($t->wait_until(sub {
        @left = (clients_of($S->master_port, @old),
            map { clients_of($_, @old) } @SP);
        !@left }, timeout => 10), 'reload: the old workers\' connections'
        . ' are closed');
    is($t->request('/ev')->status, 200, 'a request after the reload');
    ok($t->wait_until(sub { ($t->redis_query('XLEN', 'cg:events') // 0)
        >= 2 }), 'its event written');
}

###########################################################################
# a wrong Sentinel password

{
    my $b = $t->nginx('bad');
    conf($b, 'bad', 'wrong.pw');
    $b->run;
    my $port = $t->port('bad');
    ok($b->wait_for_log(qr/redis redis:\/\/\S+ refused setup: WRONGPASS/,
        timeout => 5), 'a wrong Sentinel password: refused setup logged');
    my $r = $b->request('/ev', port => $port);
    is($r->status, 200, 'requests are still answered');
    my $sp = metric($b->metrics(port => $port), 'civicgate_events_total',
        result => 'spooled');
    is($sp, 1, 'the event waits in the spool');
    my @bw = $b->worker_pids;
    is(scalar(clients_of($S->master_port, @bw)), 0,
        'no connection of that gateway on the master');
    is(scalar(clients_of($S->master_port, $t->worker_pids)), 2,
        'the other gateway\'s still there');
    $b->stop;
}

$t->done_testing;
