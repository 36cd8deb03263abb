#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The raw citizen identifier never leaves the gateway: after a run of API,
# admin and check requests (good and bad) with a distinctive raw id, it is
# in no Redis key or value (every key SCANned, DUMPed and read), in no
# command sent to Redis (MONITOR), in no invalidation message (SUBSCRIBE),
# in no error.log (info) or access.log (combined) line, and in no response
# of the module.  Controls: the same searches find the pseudonym.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Socket::INET;
use JSON::PP ();
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $JSON = JSON::PP->new->utf8->canonical;

my $RAW = 'NIK-3174-0000-RAWID-99';
my @NEEDLES = ($RAW, 'RAWID-99', '3174-0000', lc($RAW));
my $KEY = random_key_hex(32);
my $PS = pseudonym($KEY, $RAW);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

$t->write_nginx_conf(<<'EOF', worker_processes => 2);
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;

    civicgate_consent_purposes {
        health "Layanan kesehatan" "Health services";
        tax    "Perpajakan"        "Taxation";
    }
    civicgate_consent_cache zone=consent:1m ttl=60s;
    civicgate_consent_grant_url https://portal.example.go.id/consents;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        client_body_buffer_size 1k;
        civicgate_journey on secure=off;
        civicgate_citizen $http_x_citizen_id;
        civicgate_channel $http_x_channel;

        location /svc/ {
            civicgate_service svc;
            civicgate_consent health;
            proxy_pass http://127.0.0.1:%%PORT_1%%/echo/;
        }
        location /two/ {
            civicgate_consent health tax;
            proxy_pass http://127.0.0.1:%%PORT_1%%/echo/;
        }
        location /consents/ {
            civicgate_consent_api;
        }
        location /civicgate/admin/ {
            allow 127.0.0.1;
            deny all;
            civicgate_admin;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_1%%;
        server_name backend;
        location /echo/ {
            return 200 "backend reached\n";
        }
    }
EOF

$t->run_redis;

# a MONITOR and a SUBSCRIBE connection, raw bytes to files
my $MON = $t->topdir . '/monitor.raw';
my $SUB = $t->topdir . '/subscribe.raw';
for my $c ([ $MON, "*1\r\n\$7\r\nMONITOR\r\n" ],
           [ $SUB, "*2\r\n\$9\r\nSUBSCRIBE\r\n\$21\r\ncg:consent:invalidate\r\n" ]) {
    my ($file, $cmd) = @$c;
    my $port = $t->redis_port;
    $t->run_daemon(sub {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $port, Proto => 'tcp') or die "connect: $!";
        syswrite($s, $cmd);
        open my $fh, '>', $file or die;
        binmode $fh;
        my $old = select $fh; $| = 1; select $old;
        my $end = time + 60;
        while (time < $end) {
            my $n = sysread($s, my $buf, 65536);
            last unless $n;
            print $fh $buf;
        }
    });
}
ok($t->wait_until(sub { -s $MON && -s $SUB }), 'MONITOR and SUBSCRIBE running');

$t->run;

my @responses;
sub req {
    my ($method, $path, %o) = @_;
    my @h = @{ $o{headers} || [] };
    my $r = $t->request($path, method => $method, headers => \@h,
        (defined $o{body} ? (body => $o{body}) : ()));
    push @responses, [ "$method $path", $r ];
    return $r;
}
sub as_citizen { [ 'X-Citizen-Id' => $RAW, 'X-Channel' => 'web', @_ ] }

###########################################################################
# the run

my @steps;
sub step { my ($name, $r, $want) = @_; push @steps, [ $name, $r->status, $want ] }

step('check, missing', req('GET', '/svc/a', headers => as_citizen()), 403);
step('check, missing, id', req('GET', '/svc/a',
    headers => as_citizen('Accept-Language' => 'id-ID')), 403);
step('list', req('GET', '/consents/', headers => as_citizen()), 200);
step('API grant', req('PUT', '/consents/health', headers => as_citizen(),
    body => '{"notes":"web consent"}'), 201);
step('API grant, bad body', req('PUT', '/consents/tax', headers => as_citizen(),
    body => '{"notes":"x","bogus":1}'), 400);
step('API grant, malformed', req('PUT', '/consents/tax', headers => as_citizen(),
    body => '{"notes":'), 400);
step('API unknown purpose', req('PUT', '/consents/nope',
    headers => as_citizen(), body => '{}'), 400);
step('API wrong method', req('POST', '/consents/health',
    headers => as_citizen(), body => '{}'), 405);
step('API body too large', req('PUT', '/consents/tax', headers => as_citizen(),
    body => '{"notes":"x"' . (' ' x 3000) . '}'), 413);
step('check, granted', req('GET', '/svc/b', headers => as_citizen()), 200);
step('check, two purposes', req('GET', '/two/b', headers => as_citizen()), 403);
my $entry = req('GET', '/consents/health', headers => as_citizen());
step('entry', $entry, 200);
my $receipt;
{
    my $r = req('DELETE', '/consents/health', headers => as_citizen());
    step('API withdrawal', $r, 200);
    $receipt = $r->body;
}
step('verify', req('POST', '/consents/receipts/verify', body => $receipt), 200);
step('check, withdrawn', req('GET', '/svc/c', headers => as_citizen()), 403);

# the counter: the raw id travels in the JSON body
my @ct = ('Content-Type' => 'application/json', 'X-Channel' => 'counter');
step('admin grant', req('PUT', '/civicgate/admin/consents/tax', headers => \@ct,
    body => $JSON->encode({ citizen => $RAW, notes => 'at the counter' })), 201);
step('admin grant health', req('PUT', '/civicgate/admin/consents/health',
    headers => \@ct, body => $JSON->encode({ citizen => $RAW })), 201);
step('admin, unknown field', req('PUT', '/civicgate/admin/consents/tax',
    headers => \@ct, body => $JSON->encode({ citizen => $RAW, who => $RAW })), 400);
step('admin, malformed', req('PUT', '/civicgate/admin/consents/tax',
    headers => \@ct, body => '{"citizen":"' . $RAW . '"'), 400);
step('admin, expires_at past', req('PUT', '/civicgate/admin/consents/tax',
    headers => \@ct, body => $JSON->encode({ citizen => $RAW,
        expires_at => '2001-01-01T00:00:00Z' })), 400);
step('admin, unknown purpose', req('PUT', '/civicgate/admin/consents/nope',
    headers => \@ct, body => $JSON->encode({ citizen => $RAW })), 400);
step('admin, unknown path', req('PUT', '/civicgate/admin/other',
    headers => \@ct, body => $JSON->encode({ citizen => $RAW })), 404);
step('admin, wrong method', req('POST', '/civicgate/admin/consents/tax',
    headers => \@ct, body => $JSON->encode({ citizen => $RAW })), 405);
step('admin, body too large', req('PUT', '/civicgate/admin/consents/tax',
    headers => \@ct, body => $JSON->encode({ citizen => $RAW,
        notes => 'n' x 400 }) . (' ' x 3000)), 413);
step('check, granted at the counter', req('GET', '/two/d',
    headers => as_citizen()), 200);
step('admin withdrawal', req('DELETE', '/civicgate/admin/consents/tax',
    headers => \@ct, body => $JSON->encode({ citizen => $RAW })), 200);
step('check after admin withdrawal', req('GET', '/two/e',
    headers => as_citizen()), 403);

is_deeply([ map { "$_->[0]: $_->[1]" } @steps ],
    [ map { "$_->[0]: $_->[2]" } @steps ], 'every request answered as expected');

# the events of these requests are written at the log phase
ok($t->wait_until(sub {
    ($t->redis_query('XLEN', 'cg:events') // 0) >= scalar @responses }),
    'the journey events are written');
sleep 0.3;

###########################################################################
# Redis: keys, values, commands, messages

{
    my $f = $t->redis_find_strings(@NEEDLES, $PS);
    my @keys = @{ $f->{_keys} };
    ok(scalar @keys >= 3, scalar(@keys) . ' keys in Redis');
    ok(scalar(grep { $_ eq "cg:{c:$PS}:consents" } @keys),
        "the consents hash is cg:{c:<pseudonym>}:consents");
    for my $n (@NEEDLES) {
        is_deeply($f->{$n}, [], "'$n' in no Redis key name or value")
            or diag explain $f->{$n};
    }
    ok(scalar(grep { /^key name/ } @{ $f->{$PS} })
        && scalar(grep { /^LRANGE cg:\{j:/ } @{ $f->{$PS} })
        && scalar(grep { /^XRANGE cg:events/ } @{ $f->{$PS} }),
        'control: the pseudonym is found in key names, timelines and streams')
        or diag explain $f->{$PS};

    my $mon = $t->read_file($MON) // '';
    ok(length $mon > 1000, 'MONITOR captured ' . length($mon) . ' bytes');
    like($mon, qr/HMGET/, 'control: MONITOR saw the HMGETs');
    like($mon, qr/\Q$PS\E/, 'control: MONITOR saw the pseudonym');
    for my $n (@NEEDLES) {
        ok(index($mon, $n) < 0, "'$n' in no command sent to Redis (MONITOR)");
    }

    my $sub = $t->read_file($SUB) // '';
    my @msgs = $sub =~ /\$7\r\nmessage\r\n\$21\r\ncg:consent:invalidate\r\n\$\d+\r\n([^\r]*)\r\n/g;
    is(scalar @msgs, 5, 'five invalidation messages (2 API, 3 admin changes)');
    is_deeply([ grep { $_ ne $PS } @msgs ], [],
        'every invalidation message is the pseudonym');
    for my $n (@NEEDLES) {
        ok(index($sub, $n) < 0, "'$n' in no invalidation message");
    }
}

###########################################################################
# logs and responses

{
    $t->stop;    # everything flushed to the logs
    my $err = $t->error_log;
    my $acc = $t->access_log;
    like($err, qr/\[info\].*civicgate: /, 'control: error.log has civicgate '
        . 'info lines');
    like($err, qr/\[info\]/, 'control: error.log is at level info');
    like($acc, qr{"PUT /civicgate/admin/consents/tax HTTP/1\.1" 201},
        'control: access.log in the combined format has the request lines');
    is(scalar(grep { !m{"GET /echo/} } split /\n/, $acc), scalar @responses,
        'access.log: one line per request (besides the backend\'s)');
    for my $n (@NEEDLES) {
        my @e = grep { index($_, $n) >= 0 } split /\n/, $err;
        is_deeply(\@e, [], "'$n' in no error.log line");
        my @a = grep { index($_, $n) >= 0 } split /\n/, $acc;
        is_deeply(\@a, [], "'$n' in no access.log line");
    }

    my @leaks;
    for my $x (@responses) {
        my ($name, $r) = @$x;
        push @leaks, $name if grep { index($r->raw // '', $_) >= 0 } @NEEDLES;
    }
    is_deeply(\@leaks, [], 'no response of the module contains the raw id');
    my $rc = eval { $JSON->decode($receipt) };
    is($rc && $rc->{citizen}, $PS, 'control: receipts name the pseudonym');
}

$t->done_testing;
