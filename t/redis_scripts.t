#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Lua scripts on the Redis connection:
#
#   - a reload does not send every script again: one SCRIPT EXISTS per
#     connection, no SCRIPT LOAD when Redis has them;
#   - after SCRIPT FLUSH, a burst of commands that each get NOSCRIPT costs
#     one SCRIPT LOAD, and every command is sent again: no event fails;
#   - an ACL that refuses SCRIPT EXISTS makes a connection load every
#     script, not fail;
#   - a script Redis refuses to load is not a silent failure: the refusal
#     and the command's NOSCRIPT are logged, the event is spooled.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
$t->write_secret_file('keys', [ [ k1 => random_key_hex(32) ] ]);

$t->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%% timeout=1s;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_journey on;

        location /a {
            civicgate_service a;
            return 200 "ok\n";
        }
        location = /metrics {
            civicgate_events off;
            civicgate_metrics;
        }
    }
EOF

$t->run_redis;
$t->run;

sub events {
    my ($result) = @_;
    my $m = $t->metrics or return 0;
    return metric($m, 'civicgate_events_total', result => $result) // 0;
}

# calls of "SCRIPT <sub>" since the last CONFIG RESETSTAT
sub script_calls {
    my ($sub) = @_;
    my $info = $t->redis_query('INFO', 'commandstats') // '';
    my ($n) = $info =~ /^cmdstat_script\|\Q$sub\E:calls=(\d+)/m;
    return $n // 0;
}

sub burst {
    my ($n) = @_;
    my @req = map { "GET /a HTTP/1.0\r\nHost: localhost\r\n\r\n" } 1 .. $n;
    my @res = http_burst(\@req, port => $t->port(0), timeout => 10);
    return scalar grep { defined && m{^HTTP/1\.\d 200} } @res;
}

sub wait_written {
    my ($want, $what) = @_;
    my $got = 0;
    ok($t->wait_until(sub { ($got = events('written')) >= $want },
        timeout => 10), "$what: $want events written")
        or diag "written: $got";
}

is(burst(1), 1, 'first request');
wait_written(1, 'first request');

###########################################################################
# a reload: the new worker checks, loads nothing

{
    $t->redis_query('CONFIG', 'RESETSTAT');
    my @old = $t->worker_pids;
    ok($t->reload, 'reload');
    my ($new) = grep { my $p = $_; !grep { $_ == $p } @old } $t->worker_pids;
    ok($t->wait_until(sub {
        grep { ($_->{name} // '') eq "civicgate-$new" } $t->redis_clients;
    }, timeout => 10), 'the new worker connected');

    my $w0 = events('written');
    is(burst(5), 5, 'requests after the reload');
    wait_written($w0 + 5, 'after the reload');

    is(script_calls('load'), 0, 'no SCRIPT LOAD after a reload (Redis has '
        . 'the scripts)');
    cmp_ok(script_calls('exists'), '>=', 1, 'a SCRIPT EXISTS instead');
}

###########################################################################
# SCRIPT FLUSH: a burst of NOSCRIPT, one SCRIPT LOAD

{
    my $mark = $t->log_mark;
    my ($w0, $f0) = (events('written'), events('failed'));
    $t->redis_query('SCRIPT', 'FLUSH');
    $t->redis_query('CONFIG', 'RESETSTAT');

    is(burst(20), 20, '20 requests at once after SCRIPT FLUSH');
    wait_written($w0 + 20, 'after SCRIPT FLUSH');

    is(script_calls('load'), 1, 'one SCRIPT LOAD for the whole burst');
    is(events('failed') - $f0, 0, 'no event failed: each was sent again');
    unlike($t->log_since($mark), qr/refused/, 'nothing refused');
}

###########################################################################
# an ACL without SCRIPT EXISTS (written for an older gateway): the
# connection loads every script instead of failing its setup

{
    my $mark = $t->log_mark;
    my ($w0, $f0) = (events('written'), events('failed'));
    $t->redis_query('ACL', 'SETUSER', 'default', '-script|exists');
    $t->redis_query('SCRIPT', 'FLUSH');
    $t->redis_query('CONFIG', 'RESETSTAT');

    my @gw = grep { ($_->{name} // '') =~ /^civicgate-/ } $t->redis_clients;
    $t->redis_query('CLIENT', 'KILL', 'ID', $_->{id}) for @gw;
    my %old = map { $_->{id} => 1 } @gw;
    ok($t->wait_until(sub {
        grep { ($_->{name} // '') =~ /^civicgate-/ && !$old{ $_->{id} } }
            $t->redis_clients;
    }, timeout => 10), 'the gateway connected again');

    is(burst(5), 5, 'requests without SCRIPT EXISTS allowed');
    wait_written($w0 + 5, 'without SCRIPT EXISTS');
    is(events('failed') - $f0, 0, 'no event failed');
    cmp_ok(script_calls('load'), '>=', 1, 'the scripts were loaded');
    unlike($t->log_since($mark), qr/refused setup/, 'the setup went through');

    $t->redis_query('ACL', 'SETUSER', 'default', '+@all');
}

###########################################################################
# a script that cannot be loaded: logged, the event kept

{
    my $mark = $t->log_mark;
    my $f0 = events('failed');
    $t->redis_query('ACL', 'SETUSER', 'default', '-script|load');
    $t->redis_query('SCRIPT', 'FLUSH');
    $t->redis_query('CONFIG', 'RESETSTAT');

    is(burst(3), 3, 'requests while SCRIPT LOAD is refused');
    ok($t->wait_until(sub { events('failed') - $f0 >= 3 }, timeout => 10),
        'the events failed (and wait in the spool)');
    my $log = $t->log_since($mark);
    like($log, qr/\[error\].*civicgate: redis refused a script load: NOPERM/,
        'the refused SCRIPT LOAD is logged');
    like($log, qr/\[error\].*civicgate: redis refused a journey event: NOSCRIPT/,
        "the command's NOSCRIPT is logged");

    # read while nothing can be written: once allowed, the spool may be
    # written before a slow metrics request returns
    my $w0 = events('written');
    $t->redis_query('ACL', 'SETUSER', 'default', '+@all');
    ok($t->wait_until(sub { events('written') - $w0 >= 3 }, timeout => 15),
        'once allowed again, the spooled events are written');
}

$t->done_testing;
