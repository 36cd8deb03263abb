#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Consent while Redis is away: cached decisions still answer until their
# TTL (ttl=2s), an uncached check fails closed (503 problem+json,
# on_error=deny by default) or passes with status ERROR (on_error=allow);
# the API answers 503 and changes nothing; when Redis is back everything is
# normal again.  Clients that go away while their check waits on a stalled
# Redis (accepts, never answers), also while the check of an auth_request
# or mirror subrequest waits, leave the worker healthy (no use after free:
# no crash, no alert/crit, nothing under valgrind).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use IO::Select;
use IO::Socket::INET;
use JSON::PP ();
use Socket qw(SOL_SOCKET SO_LINGER);
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $JSON = JSON::PP->new->utf8->canonical;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

my $COMMON = <<'EOF';
    civicgate_secret_file %%TOPDIR%%/keys;

    civicgate_consent_purposes {
        health "Layanan kesehatan" "Health services";
        tax    "Perpajakan"        "Taxation";
    }

    server {
        listen 127.0.0.1:%%PORT_@G@%%;
        server_name localhost;

        civicgate_citizen $http_x_citizen_id;
        add_header X-Consent-Status $civicgate_consent_status always;

        location /svc/ {
            civicgate_consent health;
            proxy_pass http://127.0.0.1:%%PORT_@G@back%%/echo/svc/;
        }
        location /deny/ {
            civicgate_consent health on_error=deny;
            proxy_pass http://127.0.0.1:%%PORT_@G@back%%/echo/deny/;
        }
        location /allow/ {
            civicgate_consent health on_error=allow;
            proxy_pass http://127.0.0.1:%%PORT_@G@back%%/echo/allow/;
        }
        location /two/ {
            civicgate_consent health tax;
            proxy_pass http://127.0.0.1:%%PORT_@G@back%%/echo/two/;
        }
        location /plain/ {
            proxy_pass http://127.0.0.1:%%PORT_@G@back%%/echo/plain/;
        }
        location /ar/ {
            auth_request /authz;
            proxy_pass http://127.0.0.1:%%PORT_@G@back%%/echo/ar/;
        }
        location = /authz {
            internal;
            civicgate_consent health;
            proxy_pass http://127.0.0.1:%%PORT_@G@back%%/echo/authz;
        }
        location /mr/ {
            mirror /mirror;
            proxy_pass http://127.0.0.1:%%PORT_@G@back%%/echo/mr/;
        }
        location = /mirror {
            internal;
            civicgate_consent health;
            proxy_pass http://127.0.0.1:%%PORT_@G@back%%/echo/mirror;
        }
        location /consents/ {
            civicgate_consent_api;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_@G@back%%;
        server_name backend;
        location /echo/ {
            return 200 "backend reached $request_uri\n";
        }
    }
EOF

sub conf {
    my ($g, $extra) = @_;
    (my $c = $COMMON) =~ s/\@G\@/$g/g;
    return $extra . $c;
}

$t->write_nginx_conf(conf('0', <<'EOF'), worker_processes => 2);
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;
    civicgate_consent_cache zone=consent:1m ttl=2s negative_ttl=5s;
EOF

$t->run_redis;
$t->run;

my $n = 0;
sub citizen { sprintf 'CIT-OUT-%s-%d', unpack('H*', random_bytes(3)), ++$n }

sub check {
    my ($path, $cit, %o) = @_;
    return $t->request($path, timeout => 5, port => $o{port},
        headers => [ (defined $cit ? ('X-Citizen-Id' => $cit) : ()) ]);
}

sub api {
    my ($method, $path, $cit, $body) = @_;
    return $t->request($path, method => $method, timeout => 5,
        headers => [ 'X-Citizen-Id' => $cit,
            (defined $body ? ('Content-Type' => 'application/json') : ()) ],
        (defined $body ? (body => $body) : ()));
}

sub json_of { my $d = eval { $JSON->decode($_[0]->body // '') }; $d }

sub check_503 {
    my ($r, $name) = @_;
    is($r->status, 503, "$name: 503") or diag $r->raw;
    like($r->header('Content-Type') // '', qr{^application/problem\+json\b},
        "$name: problem+json");
    my $p = json_of($r);
    is($p && $p->{type}, 'urn:civicgate:problem:consent-unavailable',
        "$name: type consent-unavailable");
    is($p && $p->{status}, 503, "$name: status member 503");
    ok($p && defined $p->{title} && length $p->{title}, "$name: title");
    is($r->header('X-Consent-Status'), 'ERROR', "$name: status ERROR");
    unlike($r->body // '', qr/backend reached/, "$name: backend not reached");
}

###########################################################################
# Redis stopped: cached decisions answer until their TTL

my $C1 = citizen();    # granted and cached
my $C2 = citizen();    # no consent, never checked
my $C3 = citizen();    # no consent, denial cached
my $C4 = citizen();    # granted, never checked (uncached)
my $K1 = 'cg:{c:' . pseudonym($KEY, $C1) . '}:consents';

is(api('PUT', '/consents/health', $C1)->status, 201, 'C1: health granted');
is(api('PUT', '/consents/health', $C4)->status, 201, 'C4: health granted');
sleep 0.2;    # the grants' invalidation messages are behind every worker

my $r = check('/svc/a', $C1);
is($r->status, 200, 'C1: 200 (the grant is cached now, ttl=2s)');
my $t_cached = time;
is(check('/svc/a', $C3)->status, 403, 'C3: 403 (denial cached, negative_ttl=5s)');
my $K1_before = $t->redis_hash($K1);
is($t->redis_query('SAVE'), 'OK', 'Redis SAVE (data kept over the restart)');

my $mark = $t->log_mark;
$t->stop_redis;
my $t_down = time;
diag sprintf 'Redis stopped %.2f s after the grant was cached', $t_down - $t_cached;

{
    $r = check('/svc/b', $C1);
    is($r->status, 200, 'Redis down: cached grant passes');
    is($r->header('X-Consent-Status'), 'GRANTED', 'cached grant: GRANTED');
    is($r->body, "backend reached /echo/svc/b\n", 'cached grant: backend reached');
    $r = check('/allow/b', $C1);
    is($r->status, 200, 'Redis down: cached grant passes (on_error=allow)');
    is($r->header('X-Consent-Status'), 'GRANTED',
        'cached grant on an on_error=allow location: GRANTED, not ERROR');

    $r = check('/svc/b', $C3);
    is($r->status, 403, 'Redis down: cached denial denies');
    is($r->header('X-Consent-Status'), 'DENIED', 'cached denial: DENIED');

    check_503(check('/svc/c', $C2), 'Redis down, uncached (no consent)');
    check_503(check('/svc/c', $C4), 'Redis down, uncached (granted in Redis)');
    check_503(check('/deny/c', $C4), 'Redis down, on_error=deny explicitly');
    check_503(check('/two/c', $C1),
        'Redis down, health cached but tax not');
    my $id = $t->request('/svc/c', timeout => 5,
        headers => [ 'X-Citizen-Id' => $C2, 'Accept-Language' => 'id-ID' ]);
    is($id->status, 503, 'Redis down, Indonesian: 503');
    my ($pe, $pi) = (json_of(check('/svc/c', $C2)), json_of($id));
    ok($pe && $pi && $pe->{title} ne $pi->{title},
        '503 title in Indonesian with Accept-Language id-ID');

    for my $c ([ $C2, 'no consent' ], [ $C4, 'granted in Redis' ]) {
        $r = check('/allow/d', $c->[0]);
        is($r->status, 200, "Redis down, on_error=allow, uncached ($c->[1]): 200");
        is($r->header('X-Consent-Status'), 'ERROR',
            "on_error=allow: \$civicgate_consent_status ERROR");
        is($r->body, "backend reached /echo/allow/d\n",
            'on_error=allow: backend reached');
    }

    $r = check('/svc/e', undef);
    is($r->status, 401, 'Redis down, no identity: 401');

    # the API: 503 problem+json, nothing changed
    for my $m ([ 'PUT', '/consents/health' ], [ 'DELETE', '/consents/health' ],
               [ 'PUT', '/consents/tax' ], [ 'GET', '/consents/' ],
               [ 'GET', '/consents/health' ]) {
        my $a = api($m->[0], $m->[1], $C1,
            $m->[0] eq 'PUT' ? '{"notes":"while down"}' : undef);
        is($a->status, 503, "Redis down: API $m->[0] $m->[1]: 503")
            or diag $a->raw;
        like($a->header('Content-Type') // '', qr{^application/problem\+json\b},
            "Redis down: API $m->[0] $m->[1]: problem+json");
    }
    # the plain locations work as usual
    is(check('/plain/f', undef)->status, 200, 'Redis down: no-consent location 200');

    # the grant was cached for ttl=2s: after that, the check needs Redis
    my $left = $t_cached + 2.3 - time;
    sleep $left if $left > 0;
    check_503(check('/svc/g', $C1), 'Redis down, cached grant past its TTL');
    $r = check('/allow/g', $C1);
    is($r->status, 200, 'past its TTL, on_error=allow: 200');
    is($r->header('X-Consent-Status'), 'ERROR', 'past its TTL, on_error=allow: ERROR');
}

###########################################################################
# Redis back: normal

$t->run_redis;
{
    my $ok = $t->wait_until(sub { check('/svc/h', $C1)->status == 200 },
        timeout => 8, interval => 0.1);
    ok($ok, 'Redis back: C1 passes again (within 8 s)');
    # each worker reconnects on its own (jittered backoff, up to 2 s apart)
    ok($t->wait_until(sub {
        (grep { ($_->{name} // '') =~ /^civicgate-/ } $t->redis_clients) >= 4
    }, timeout => 8), 'Redis back: both workers reconnected (2 connections '
        . 'each)');
    is_deeply($t->redis_hash($K1), $K1_before,
        'the API calls while Redis was down changed nothing');
    $r = check('/svc/h', $C1);
    is($r->header('X-Consent-Status'), 'GRANTED', 'Redis back: GRANTED');
    $r = check('/svc/h', $C2);
    is($r->status, 403, 'Redis back: no consent: 403');
    is($r->header('X-Consent-Status'), 'DENIED', 'Redis back: DENIED');
    $r = check('/allow/h', $C2);
    is($r->status, 403, 'Redis back: on_error=allow still denies a missing consent');
    is(check('/svc/h', $C4)->status, 200, 'Redis back: C4 passes');
    is(api('PUT', '/consents/tax', $C1)->status, 201, 'Redis back: API grant');
    is(check('/two/h', $C1)->status, 200, 'Redis back: two purposes granted');
    is(api('DELETE', '/consents/health', $C4)->status, 200,
        'Redis back: API withdrawal');
    is(check('/svc/h', $C4)->status, 403, 'Redis back: withdrawn: 403');
}

###########################################################################
# a stalled Redis (accepts, never answers), timeout=1s: clients that go
# away while their check waits

my $STALL = $t->port('stall');
my $ACCEPTS = $t->topdir . '/stall-accepts.log';
my $dpid = $t->run_stalled_peer($STALL, $ACCEPTS);
ok($t->wait_port($STALL), 'stalled peer listening');

my $S = $t->nginx('stall');
$S->write_nginx_conf(conf('s', <<'EOF'), worker_processes => 1);
    civicgate_redis redis://127.0.0.1:%%PORT_stall%% timeout=1s;
EOF
$S->run;
my ($SW) = $S->worker_pids;
my $PS = $t->port('s');

# sends a request, waits 100 ms; if nothing came back the request waits on
# Redis: close (FIN or RST) and return 1; else return 0 (answered at once)
sub abort_while_waiting {
    my ($req, $rst, $port) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $port // $PS,
        Proto => 'tcp') or return 0;
    syswrite($s, $req);
    my $sel = IO::Select->new($s);
    my $got = $sel->can_read(0.1);
    if ($got) {
        sysread($s, my $buf, 65536);
        close $s;
        return 0;
    }
    setsockopt($s, SOL_SOCKET, SO_LINGER, pack('ii', 1, 0)) if $rst;
    close $s;
    return 1;
}

# a mirrored request is answered at once while its mirror subrequest waits
# on Redis: read the answer, then close (FIN or RST); 1 if it was a 200
sub close_while_mirror_waits {
    my ($cit, $rst, $port) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $port // $PS, Proto => 'tcp') or return 0;
    syswrite($s, "GET /mr/abort HTTP/1.1\r\nHost: x\r\n"
        . "X-Citizen-Id: $cit\r\n\r\n");
    my ($buf, $sel) = ('', IO::Select->new($s));
    while ($buf !~ /\r\n\r\n.*backend reached/s && $sel->can_read(2)) {
        sysread($s, $buf, 65536, length $buf) or last;
    }
    setsockopt($s, SOL_SOCKET, SO_LINGER, pack('ii', 1, 0)) if $rst;
    close $s;
    return $buf =~ m{^HTTP/1\.1 200 } ? 1 : 0;
}

{
    # a request that arrives while the connection is being set up waits for
    # Redis (bounded by timeout=1s) and then fails closed
    my ($waited, $tries) = (0, 0);
    my $end = time + 12;
    while (!$waited && time < $end) {
        $tries++;
        my $t0 = time;
        my $x = check('/svc/w', $C1, port => $PS);
        my $el = time - $t0;
        if ($el >= 0.3) {
            $waited = 1;
            is($x->status, 503, sprintf('stalled Redis: a waiting check ends '
                . 'in 503 after %.2f s', $el));
            cmp_ok($el, '<', 2.5, 'stalled Redis: bounded by timeout=1s');
            is($x->header('X-Consent-Status'), 'ERROR', 'stalled Redis: ERROR');
        } else {
            is($x->status, 503, 'stalled Redis, not connected: 503 at once')
                if $tries == 1;
            sleep 0.1;
        }
    }
    ok($waited, "a check waited on the stalled Redis ($tries tries)");

    my %kinds = (
        'check (FIN)' => [ "GET /svc/abort HTTP/1.1\r\nHost: x\r\nX-Citizen-Id: $C1\r\n\r\n", 0 ],
        'check (RST)' => [ "GET /svc/abort HTTP/1.1\r\nHost: x\r\nX-Citizen-Id: $C2\r\n\r\n", 1 ],
        'two purposes (FIN)' => [ "GET /two/abort HTTP/1.0\r\nX-Citizen-Id: $C1\r\n\r\n", 0 ],
        'on_error=allow (RST)' => [ "GET /allow/abort HTTP/1.1\r\nHost: x\r\nX-Citizen-Id: $C4\r\n\r\n", 1 ],
        'API PUT (FIN)' => [ "PUT /consents/health HTTP/1.1\r\nHost: x\r\nX-Citizen-Id: $C1\r\nContent-Length: 2\r\n\r\n{}", 0 ],
        'API GET (RST)' => [ "GET /consents/ HTTP/1.1\r\nHost: x\r\nX-Citizen-Id: $C1\r\n\r\n", 1 ],
        'auth_request subrequest (FIN)' => [ "GET /ar/abort HTTP/1.1\r\nHost: x\r\nX-Citizen-Id: $C1\r\n\r\n", 0 ],
        'auth_request subrequest (RST)' => [ "GET /ar/abort HTTP/1.1\r\nHost: x\r\nX-Citizen-Id: $C2\r\n\r\n", 1 ],
    );
    my %aborted;
    $end = time + 25;
    my @order = sort keys %kinds;
    my $rounds = 0;
    while (time < $end && grep { ($aborted{$_} // 0) < 2 } @order) {
        $rounds++;
        for my $k (@order) {
            next if ($aborted{$k} // 0) >= 2;
            $aborted{$k}++ if abort_while_waiting(@{ $kinds{$k} });
        }
        sleep 0.05;
    }
    for my $k (@order) {
        cmp_ok($aborted{$k} // 0, '>=', 2,
            "client closed after 100 ms while its $k waited on Redis (2 times)");
    }

    is(close_while_mirror_waits($C1, 0) + close_while_mirror_waits($C2, 1), 2,
        'answered, then closed (FIN, RST) while the mirror subrequest waited');

    # every waiting command reaches its timeout now, with its client gone
    sleep 1.5;
    my $x = check('/plain/after', undef, port => $PS);
    is($x->status, 200, 'the worker still serves after the aborts');
    is($x->body, "backend reached /echo/plain/after\n", 'a normal answer');
    my ($w) = $S->worker_pids;
    is($w, $SW, 'the same worker (no crash, no respawn)');
    my $log = $S->error_log;
    my @bad = grep { /\[(?:alert|crit|emerg)\]|exited on signal/ } split /\n/, $log;
    is_deeply(\@bad, [], 'stall instance: no alert/crit/emerg, no crash');
    like($log, qr/civicgate: redis redis:\/\/127\.0\.0\.1:$STALL timed out/,
        'the stalled commands timed out');
    # still answers checks properly afterwards
    $x = check('/svc/z', undef, port => $PS);
    is($x->status, 401, 'still answers: no identity 401');
    $x = check('/allow/z', $C2, port => $PS);
    is($x->status, 200, 'still answers: on_error=allow 200');
}

###########################################################################
# the same aborts under valgrind (if installed): no invalid read, write or
# free, i.e. no use after free of the request by the Redis reply handler

SKIP: {
    my ($vg) = grep { -x } map { "$_/valgrind" } split /:/, $ENV{PATH} // '';
    skip 'valgrind not installed', 6 unless $vg;
    # valgrind cannot run a binary built with AddressSanitizer
    skip 'nginx built with sanitizers', 6 if $ENV{CIVICGATE_SANITIZER};

    my $V = $t->nginx('vg');
    my $vglog = $V->testdir . '/valgrind.log';
    my $wrapper = $V->write_file('vg-nginx.sh', "#!/bin/sh\nexec $vg -q "
        . "--error-limit=no --log-file=$vglog $Civicgate::Test::NGINX \"\$@\"\n",
        0755);
    $V->write_nginx_conf(conf('v', <<'EOF'), master_process => 'off');
    civicgate_redis redis://127.0.0.1:%%PORT_stall%% timeout=1s;
EOF
    {
        local $Civicgate::Test::NGINX = $wrapper;
        $V->run(timeout => 30);
    }
    like(readlink('/proc/' . $V->pid . '/exe') // '', qr/memcheck|valgrind/,
        'the instance runs under valgrind');
    my $PV = $t->port('v');
    my %kinds = (
        'check' => [ "GET /svc/abort HTTP/1.1\r\nHost: x\r\nX-Citizen-Id: $C1\r\n\r\n", 0 ],
        'check (RST)' => [ "GET /two/abort HTTP/1.1\r\nHost: x\r\nX-Citizen-Id: $C2\r\n\r\n", 1 ],
        'API PUT' => [ "PUT /consents/health HTTP/1.1\r\nHost: x\r\nX-Citizen-Id: $C1\r\nContent-Length: 2\r\n\r\n{}", 0 ],
        'API GET (RST)' => [ "GET /consents/health HTTP/1.1\r\nHost: x\r\nX-Citizen-Id: $C1\r\n\r\n", 1 ],
        'auth_request subrequest' => [ "GET /ar/abort HTTP/1.1\r\nHost: x\r\nX-Citizen-Id: $C1\r\n\r\n", 0 ],
    );
    my %aborted;
    my $end = time + 20;
    while (time < $end && grep { ($aborted{$_} // 0) < 2 } keys %kinds) {
        for my $k (sort keys %kinds) {
            next if ($aborted{$k} // 0) >= 2;
            $aborted{$k}++ if abort_while_waiting(@{ $kinds{$k} }, $PV);
        }
        sleep 0.05;
    }
    is(scalar(grep { ($aborted{$_} // 0) >= 2 } keys %kinds), scalar keys %kinds,
        'valgrind: every kind of request aborted twice while waiting')
        or diag explain \%aborted;
    is(close_while_mirror_waits($C1, 0, $PV)
        + close_while_mirror_waits($C2, 1, $PV), 2,
        'valgrind: closed while the mirror subrequest waited');
    sleep 1.5;
    my $x = check('/plain/vg', undef, port => $PV);
    is($x->status, 200, 'valgrind: still serves after the aborts');
    $V->stop;
    my $report = $V->read_file($vglog) // '';
    my @errors = $report =~ /^==\d+== (Invalid (?:read|write|free)[^\n]*|Mismatched free[^\n]*|Source and destination overlap[^\n]*)/mg;
    is_deeply(\@errors, [], 'valgrind: no invalid read/write/free')
        or diag substr($report, 0, 6000);
    unlike($V->error_log, qr/\[(?:alert|crit)\]|exited on signal/,
        'valgrind instance: no alert/crit');
}

$t->done_testing;
