#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Self-test of t/lib/Civicgate/Test.pm: independent crypto helpers against
# published vectors, ports, HTTP parsing, Redis start/stop/restart, daemons,
# and the built-in error.log checks (run in child test scripts).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;

###########################################################################
# crypto helpers

# RFC 5869 test case 1 (salt given) and test case 3 (empty salt and info)
is(unpack('H*', hkdf_sha256("\x0b" x 22, pack('H*', 'f0f1f2f3f4f5f6f7f8f9'),
        42, pack('H*', '000102030405060708090a0b0c'))),
    '3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf'
    . '34007208d5b887185865', 'HKDF: RFC 5869 test case 1');
is(unpack('H*', hkdf_sha256("\x0b" x 22, '', 42)),
    '8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d'
    . '9d201395faa4b61a96c8', 'HKDF: RFC 5869 test case 3 (empty salt)');

is(crockford_encode("\x00" x 13, 100), '0' x 20, 'base32: zeros');
is(crockford_encode("\xff" x 13, 100), 'Z' x 20, 'base32: ones');
is(crockford_encode("\x08\x42\x10\x84\x21", 40), '11111111',
    'base32: 00001 repeated');
is(crockford_encode('f', 8), 'CR', 'base32: "f" (padded)');
is(unpack('H*', crockford_decode('CR')), '6600', 'base32: decode pads');
is(crockford_decode('CU'), undef, 'base32: U is not a symbol');
my $raw = random_bytes(13);
substr($raw, 12, 1) = chr(ord(substr($raw, 12, 1)) & 0xF0);
is(crockford_decode(crockford_encode($raw, 100)), $raw, 'base32: round trip');

is(canonical_journey_id('0123456789abcdefghjk'), '01234-56789-ABCDE-FGHJK',
    'canonical: lower case, hyphens added');
is(canonical_journey_id('oI2L4-56789-ABCDE-FGHJK'), '01214-56789-ABCDE-FGHJK',
    'canonical: O I L substituted');
is(canonical_journey_id('01234-56789-ABCDE-FGHJU'), undef, 'canonical: U');
is(canonical_journey_id('01234-56789-ABCDE-FGHJ'), undef, 'canonical: 19');
is(canonical_journey_id('0-1-2-3-4-5-6-7-8-9-A-B-C-D-E-F-G-H-J-K'),
    '01234-56789-ABCDE-FGHJK', 'canonical: hyphens anywhere');

{
    # a fixed vector, computed step by step with the primitives
    my $key = '00' x 32;
    my $unique = pack 'H*', '0001020304050607';
    my $sub = hkdf_sha256(pack('H*', $key), 'civicgate journey id v1', 32);
    my $mac = Digest::SHA::hmac_sha256("civicgate-journey$unique", $sub);
    my $tag = substr($mac, 0, 4) . chr(ord(substr($mac, 4, 1)) & 0xF0);
    my $want = crockford_encode($unique . $tag, 100);
    my $id = mint_journey_id($key, $unique);
    is($id =~ s/-//gr, $want, 'mint: unique || 36-bit tag, 20 symbols');
    like($id, journey_id_re(), 'mint: canonical form');
    is(verify_journey_id($id, random_key_hex(), $key), 1,
        'verify: index of the verifying key');
    is(verify_journey_id(lc($id) =~ s/-//gr, $key), 0, 'verify: canonicalises');
    my $x = $id;
    substr($x, 0, 1) = substr($x, 0, 1) eq '1' ? '2' : '1';
    is(verify_journey_id($x, $key), undef, 'verify: changed symbol fails');
    is(length(pseudonym($key, 'abc')), 32, 'pseudonym: 32 hex digits');
    is(pseudonym($key, 'abc'), unpack('H*', substr(Digest::SHA::hmac_sha256(
        'abc', hkdf_sha256(pack('H*', $key),
            'civicgate citizen pseudonym v1', 32)), 0, 16)),
        'pseudonym: definition');
}

###########################################################################
# ports, HTTP parsing

{
    my %p = map { $_ => $t->port($_) } 0 .. 5, 'redis';
    is(scalar(keys %{ { reverse %p } }), 7, 'ports: distinct');
    is($t->port(3), $p{3}, 'ports: stable');
    is($t->nginx('x')->port(3), $p{3}, 'ports: shared with instances');

    my $r = parse_response("HTTP/1.1 200 OK\r\nA: 1\r\na: 2\r\n"
        . "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n");
    is($r->status, 200, 'parse: status');
    is($r->header('A'), '1, 2', 'parse: joined header');
    is_deeply([ $r->header_list('a') ], [ 1, 2 ], 'parse: header list');
    is($r->body, 'abcde', 'parse: de-chunked');
    is(parse_response(undef)->status, 0, 'parse: no response');

    my $m = parse_metrics("# HELP x\nx_total{a=\"1\",b=\"2\"} 3\n"
        . "x_total{a=\"1\",b=\"3\"} 4\ny 5\n");
    is(metric($m, 'x_total', a => 1), 7, 'metric: sum over matching series');
    is(metric($m, 'x_total', b => 3), 4, 'metric: label filter');
    is(metric($m, 'x_total', b => 9), undef, 'metric: no match');
    is(metric($m, 'y'), 5, 'metric: unlabelled');
}

###########################################################################
# nginx without the module; daemons

{
    my $n = $t->nginx('plain');
    $n->write_nginx_conf(<<'EOF', load_module => 0);
    server {
        listen 127.0.0.1:%%PORT_0%%;
        location / { return 200 "hello $http_x_a\n"; }
        location /chunked { return 200 "x"; }
    }
EOF
    $n->run;
    my $r = $n->request('/', headers => [ 'X-A' => 'b' ]);
    is($r->status, 200, 'nginx: request');
    is($r->body, "hello b\n", 'nginx: body with header');
    $r = parse_response(http_get('/', port => $t->port(0), version => '1.0'));
    is($r->version, '1.1', 'nginx: HTTP/1.0 request answered');
    $r = parse_response($n->raw_http("GARBAGE\r\n\r\n"));
    is($r->status, 400, 'nginx: raw malformed request -> 400');
    ok($n->reload, 'nginx: reload');
    is($n->request('/')->status, 200, 'nginx: after reload');
    $n->stop;
    ok(!$n->pid, 'nginx: stopped');
    is(http_get('/', port => $t->port(0), quiet => 1), undef,
        'nginx: no answer when stopped');
    $n->run;
    is($n->request('/')->status, 200, 'nginx: restarted');
    $n->stop;

    my $port = $t->port('daemon');
    my $pid = $t->run_daemon(sub {
        my $l = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
            LocalPort => $port, Listen => 5, ReuseAddr => 1) or die;
        while (my $c = $l->accept) {
            print $c "HTTP/1.0 200 OK\r\n\r\ndaemon\n";
            close $c;
        }
    });
    ok($t->wait_port($port), 'daemon: listening');
    is(parse_response(http_get('/', port => $port))->body, "daemon\n",
        'daemon: answers');
    $t->stop_daemon($pid);
    ok(!kill(0, $pid), 'daemon: stopped');
}

###########################################################################
# redis

SKIP: {
    skip 'redis-cli not found', 9 unless $Civicgate::Test::REDIS_CLI;
    $t->run_redis;
    my $port = $t->redis_port;
    is($port, $t->port('redis'), 'redis: on port("redis")');
    is(scalar $t->redis_cmd('SET', 'k', 'v 1'), 'OK', 'redis: SET');
    is(scalar $t->redis_cmd('GET', 'k'), 'v 1', 'redis: GET (raw)');
    is_deeply([ $t->redis_cmd('MGET', 'k', 'nope') ], [ 'v 1', '' ],
        'redis: list context lines');
    $t->stop_redis;
    ok(!$t->redis_pid, 'redis: stopped');
    ok(!IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port),
        'redis: port closed');
    $t->run_redis;
    is(scalar $t->redis_cmd('PING'), 'PONG', 'redis: restarted, same port');
    is(scalar $t->redis_cmd('GET', 'k'), '', 'redis: no persistence');
    kill 'STOP', $t->redis_pid;
    my $t0 = time;
    my $out = http("PING\r\n", port => $port, timeout => 1, quiet => 1);
    kill 'CONT', $t->redis_pid;
    ok(!defined $out, 'redis: SIGSTOP stalls it (for stalled-peer tests)');
    $t->stop_redis;
}

###########################################################################
# built-in log checks, in child test scripts

sub child {
    my ($name, $body) = @_;
    my $lib = "$FindBin::Bin/lib";
    my $script = $t->write_file("$name.pl", <<"EOF");
use strict; use warnings;
use lib '$lib';
use Test::More;
use Civicgate::Test qw(:all);
my \$t = Civicgate::Test->new;
\$t->write_nginx_conf('server { listen 127.0.0.1:%%PORT_0%%; location / { return 200; } }',
    load_module => 0);
$body
EOF
    my $out = `$^X $script 2>&1`;
    return ($? >> 8, $out);
}

{
    my ($rc, $out) = child('clean', <<'EOF');
$t->run; ok($t->request('/')->status == 200, 'req');
$t->done_testing;
EOF
    is($rc, 0, 'check: clean run passes') or diag $out;
    like($out, qr/^ok 2 - nginx \(main\) error\.log has no/m,
        'check: a test per instance');

    ($rc, $out) = child('alert', <<'EOF');
$t->run;
open my $fh, '>>', $t->testdir . '/error.log';
print $fh "2024/01/01 00:00:00 [alert] 1#1: planted alert\n";
close $fh;
$t->done_testing;
EOF
    isnt($rc, 0, 'check: planted [alert] fails the test');
    like($out, qr/^not ok 1 - nginx \(main\) error\.log/m,
        'check: failing test reported');
    like($out, qr/planted alert/, 'check: offending line shown');

    ($rc, $out) = child('allowed', <<'EOF');
$t->run;
$t->allow_log(qr/planted alert/);
open my $fh, '>>', $t->testdir . '/error.log';
print $fh "2024/01/01 00:00:00 [alert] 1#1: planted alert\n";
close $fh;
$t->done_testing;
EOF
    is($rc, 0, 'check: allow_log') or diag $out;

    # make test-asan: a sanitizer report in error.log or in the output of
    # nginx -t fails the test, even where allow_log would let it pass
    {
        local $ENV{CIVICGATE_SANITIZER} = 'address,undefined';
        ($rc, $out) = child('sanitizer', <<'EOF');
$t->run;
$t->allow_log(qr/planted/);
open my $fh, '>>', $t->testdir . '/error.log';
print $fh "x.c:1:1: runtime error: planted report\n";
close $fh;
$t->done_testing;
EOF
        isnt($rc, 0, 'check: sanitizer report in error.log fails the test');
        like($out, qr/planted report/, 'check: report line shown');

        ($rc, $out) = child('sanitizer-t', <<'EOF');
local $Civicgate::Test::NGINX = $t->write_file('report.sh',
    "#!/bin/sh\necho '==1==ERROR: AddressSanitizer: planted'\nexit 1\n", 0755);
$t->test_config;
ok(1, 'nginx -t ran');
$t->done_testing;
EOF
        isnt($rc, 0, 'check: sanitizer report from nginx -t fails the test');
        like($out, qr/AddressSanitizer: planted/, 'check: nginx -t report shown');
    }

    ($rc, $out) = child('crash', <<'EOF');
$t->run;
kill 'SEGV', $t->worker_pids;
sleep 1;
ok($t->request('/')->status == 200, 'new worker serves');
$t->done_testing;
EOF
    isnt($rc, 0, 'check: crashed worker fails the test');
    # under AddressSanitizer (make test-asan) the SIGSEGV ends in abort()
    like($out, $ENV{CIVICGATE_SANITIZER} ? qr/exited on signal (?:6|11)/
                                         : qr/exited on signal 11/,
        'check: crash line shown');

    my $pidfile = $t->topdir . '/pid-of-died';
    ($rc, $out) = child('die', <<"EOF");
\$t->run;
open my \$fh, '>', '$pidfile'; print \$fh \$t->pid; close \$fh;
die "boom\n";
EOF
    isnt($rc, 0, 'check: dying test fails');
    like($out, qr/^ok 1 - nginx \(main\) error\.log/m,
        'check: log check still runs from END');
    my ($pid) = ($t->read_file($pidfile) // '') =~ /(\d+)/;
    ok($pid && !kill(0, $pid), 'check: nginx of a dying test is stopped');

    ($rc, $out) = child('badconf', <<'EOF');
$t->write_file('nginx.conf', "daemon off; events {} http { nonsense; }\n");
$t->run;
EOF
    isnt($rc, 0, 'run: nginx that cannot start fails the test (no skip)');
    like($out, qr/unknown directive "nonsense"/, 'run: error shown');
}

$t->done_testing;
