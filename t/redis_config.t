#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Configuration of the Redis client and of journey events: "nginx -t"
# fails with [emerg] and "in FILE:LINE" of the directive on the errors the
# spec lists; every URL form and parameter is accepted; a unix socket and
# a host name work at run time; civicgate_event_stream_maxlen trims.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;

my $KEY = random_key_hex(32);
my $dir = $t->topdir;

# certificates for the rediss:// forms (files must exist for nginx -t)
{
    my $ossl = '/usr/bin/openssl';
    for my $n (qw(ca client)) {
        my $out = `cd '$dir' && '$ossl' req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout $n.key -out $n.pem -days 2 -subj '/CN=cg $n' 2>&1`;
        die "openssl: $out" if $?;
        chmod 0644, "$dir/$n.key", "$dir/$n.pem";
    }
    $t->write_file("$dir/pw", "secret\n");
}

my $SERVER = <<'EOF';
    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;
        location / {
            civicgate_journey on;
            return 200 "ok\n";
        }
    }
EOF

my $R = 'redis://127.0.0.1:%%REDIS_PORT%%';

# [ name, civicgate_redis arguments (or a whole http block text), like ]
my @fail = (
    [ 'bad scheme http://', 'http://127.0.0.1:6379', qr/civicgate_redis|http:/ ],
    [ 'no scheme', '127.0.0.1:6379', qr/civicgate_redis|127\.0\.0\.1:6379/ ],
    [ 'bad scheme redis:/', 'redis:/127.0.0.1', qr/civicgate_redis|redis:/ ],
    [ 'password in URL (user:pass@)', 'redis://cg:secret@127.0.0.1:6379',
      qr/password/ ],
    [ 'password in URL (:pass@)', 'redis://:secret@127.0.0.1:6379',
      qr/password/ ],
    [ 'unknown parameter', "$R colour=blue", qr/colour=blue|civicgate_redis/ ],
    [ 'bad timeout', "$R timeout=soon", qr/timeout=soon|civicgate_redis/ ],
    [ 'bad timeout (negative)', "$R timeout=-5ms",
      qr/timeout=-5ms|civicgate_redis/ ],
    [ 'bad connect_timeout', "$R connect_timeout=x1",
      qr/connect_timeout=x1|civicgate_redis/ ],
    [ 'bad db', "$R db=three", qr/db=three|civicgate_redis/ ],
    [ 'bad tls_verify value', "rediss://127.0.0.1:6380 tls_verify=maybe",
      qr/tls_verify=maybe|civicgate_redis/ ],
    [ 'missing password file', "$R password_file=$dir/no-such-pw",
      qr/no-such-pw|civicgate_redis/ ],
    [ 'rediss:// without tls_trusted_certificate', 'rediss://127.0.0.1:6380',
      qr/tls_trusted_certificate|civicgate_redis/ ],
    [ 'rediss:// tls_verify=on without tls_trusted_certificate',
      'rediss://127.0.0.1:6380 tls_verify=on tls_name=localhost',
      qr/tls_trusted_certificate|civicgate_redis/ ],
    [ 'tls_trusted_certificate with redis://',
      "$R tls_trusted_certificate=$dir/ca.pem", qr/tls|civicgate_redis/ ],
    [ 'tls_certificate with redis://',
      "$R tls_certificate=$dir/client.pem tls_certificate_key=$dir/client.key",
      qr/tls|civicgate_redis/ ],
    [ 'tls_name with redis://', "$R tls_name=localhost",
      qr/tls|civicgate_redis/ ],
    [ 'tls_verify=off with redis://', "$R tls_verify=off",
      qr/tls|civicgate_redis/ ],
    [ 'no URL', '', qr/civicgate_redis/ ],
);

my @http_fail = (
    [ 'civicgate_redis repeated',
      "civicgate_redis $R;\ncivicgate_redis $R; # second\n", qr/# second/,
      qr/"civicgate_redis" directive is duplicate/ ],
    [ 'civicgate_redis in server context',
      "server { listen 127.0.0.1:%%PORT_1%%;\ncivicgate_redis $R; }\n",
      qr/civicgate_redis/, qr/"civicgate_redis" directive is not allowed here/ ],
    [ 'civicgate_redis in a location',
      "server { listen 127.0.0.1:%%PORT_1%%;\nlocation / {\n"
      . "civicgate_redis $R; } }\n",
      qr/civicgate_redis/, qr/"civicgate_redis" directive is not allowed here/ ],
    [ 'civicgate_event_buffer below 32k',
      "civicgate_redis $R;\ncivicgate_event_buffer 16k;\n",
      qr/civicgate_event_buffer/, qr/civicgate_event_buffer|16k/ ],
    [ 'civicgate_event_buffer not a size',
      "civicgate_redis $R;\ncivicgate_event_buffer lots;\n",
      qr/civicgate_event_buffer/, qr/civicgate_event_buffer|lots/ ],
    [ 'civicgate_event_buffer in server context',
      "civicgate_redis $R;\nserver { listen 127.0.0.1:%%PORT_1%%;\n"
      . "civicgate_event_buffer 1m; }\n",
      qr/civicgate_event_buffer/, qr/not allowed here/ ],
    [ 'civicgate_event_stream_maxlen not a number',
      "civicgate_redis $R;\ncivicgate_event_stream_maxlen many;\n",
      qr/civicgate_event_stream_maxlen/,
      qr/civicgate_event_stream_maxlen|many/ ],
    [ 'civicgate_event_stream_maxlen in a location',
      "civicgate_redis $R;\nserver { listen 127.0.0.1:%%PORT_1%%;\n"
      . "location / {\ncivicgate_event_stream_maxlen 10; } }\n",
      qr/civicgate_event_stream_maxlen/, qr/not allowed here/ ],
    [ 'civicgate_events with a bad value',
      "civicgate_redis $R;\nserver { listen 127.0.0.1:%%PORT_1%%;\n"
      . "location / {\ncivicgate_events maybe; } }\n",
      qr/civicgate_events/, qr/civicgate_events|maybe/ ],
);

my $n = 0;
for my $c (@fail) {
    my ($name, $args, $like) = @$c;
    push @http_fail, [ $name, "civicgate_redis $args;\n",
        qr/civicgate_redis/, $like ];
}

for my $c (@http_fail) {
    my ($name, $http, $line_re, $like) = @$c;
    my $i = $t->nginx('case' . ++$n);
    $i->write_secret_file('keys', [ [ k1 => $KEY ] ]);
    $i->write_nginx_conf("civicgate_secret_file %%TESTDIR%%/keys;\n"
        . $http . $SERVER);
    my ($rc, $out) = $i->test_config;
    my $conf = $i->testdir . '/nginx.conf';
    my $ln = $i->conf_line($line_re);
    subtest "nginx -t fails: $name" => sub {
        isnt($rc, 0, 'non-zero exit');
        like($out, qr/\[emerg\]/, '[emerg]');
        like($out, $like, 'says what is wrong');
        like($out, qr/ in \Q$conf\E:$ln\b/, "points at nginx.conf:$ln");
        unlike($out, qr/test is successful/, 'not successful');
    } or diag $out;
}

###########################################################################
# valid configurations: every URL form and parameter

my @valid = (
    [ 'host:port/db', "$R/2" ],
    [ 'host name', 'redis://localhost:%%REDIS_PORT%%' ],
    [ 'default port', 'redis://127.0.0.1' ],
    [ 'user, password_file, timeouts',
      "redis://cg\@127.0.0.1:%%REDIS_PORT%%/1 password_file=$dir/pw"
      . ' timeout=150ms connect_timeout=2s' ],
    [ 'password only', "$R password_file=$dir/pw" ],
    [ 'db=', "$R db=4" ],
    [ 'unix socket', "unix:$dir/redis.sock" ],
    [ 'unix socket with db and password', "unix:$dir/redis.sock db=2"
      . " password_file=$dir/pw timeout=1s" ],
    [ 'rediss with a CA and tls_name', 'rediss://127.0.0.1:%%REDIS_PORT%%'
      . " tls_trusted_certificate=$dir/ca.pem tls_name=localhost" ],
    [ 'rediss with a client certificate', 'rediss://localhost:%%REDIS_PORT%%/5'
      . " tls_trusted_certificate=$dir/ca.pem tls_verify=on"
      . " tls_certificate=$dir/client.pem tls_certificate_key=$dir/client.key" ],
    [ 'rediss with tls_verify=off', 'rediss://127.0.0.1:%%REDIS_PORT%%'
      . ' tls_verify=off' ],
);

for my $c (@valid) {
    my ($name, $args) = @$c;
    my $i = $t->nginx('valid' . ++$n);
    $i->write_secret_file('keys', [ [ k1 => $KEY ] ]);
    $i->write_nginx_conf(<<"EOF");
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis $args;
    civicgate_event_buffer 32k;
    civicgate_event_stream_maxlen 5000;
    civicgate_events on;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;
        civicgate_events off;
        location / {
            civicgate_journey on;
            civicgate_events on;
            return 200 "ok\\n";
        }
    }
EOF
    my ($rc, $out) = $i->test_config;
    subtest "nginx -t passes: $name" => sub {
        is($rc, 0, 'exit 0');
        like($out, qr/test is successful/, 'test is successful');
        unlike($out, qr/\[(?:emerg|alert|crit|warn)\]/, 'no warning');
    } or diag $out;
}

###########################################################################
# run time: a unix socket, a host name, civicgate_event_stream_maxlen

$t->run_redis(args => [ '--unixsocket', "$dir/redis.sock",
    '--unixsocketperm', '777' ]);

{
    my $u = $t->nginx('unix');
    $u->write_secret_file('keys', [ [ k1 => $KEY ] ]);
    $u->write_nginx_conf(<<"EOF");
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis unix:$dir/redis.sock;
    civicgate_event_stream_maxlen 50;

    server {
        listen 127.0.0.1:%%PORT_unix%%;
        server_name localhost;
        location / {
            civicgate_journey on;
            civicgate_channel sms;
            civicgate_service via-unix;
            return 200 "ok\\n";
        }
    }
EOF
    $u->run;
    my $bad = 0;
    my $j;
    for (1 .. 300) {
        my $r = $u->request('/', port => $t->port('unix'),
            headers => [ defined $j ? ('X-Journey-ID' => $j) : () ]);
        $bad++ unless $r->status == 200;
        $j //= $r->header('X-Journey-ID');
    }
    is($bad, 0, 'unix socket: 300 requests answered');
    ok($t->wait_until(sub {
        ($t->redis_query({ unix => "$dir/redis.sock" }, 'LLEN',
            "cg:{j:$j}:timeline") // 0) >= 300 }, timeout => 5),
        'unix socket: 300 events written');
    my $len = $t->redis_query('XLEN', 'cg:events');
    ok($len >= 50 && $len < 300, "civicgate_event_stream_maxlen 50: "
        . "cg:events trimmed (MAXLEN ~ 50: $len entries)");
    is($t->journey_length($j), 300,
        'the journey timeline keeps its 300 events (trimmed past 1100)');
    my ($last) = @{ $t->redis_stream('cg:events') }[-1];
    is($last->{f}{service}, 'via-unix', 'unix socket: event fields');
    my @c = grep { ($_->{name} // '') =~ /^civicgate-/ } $t->redis_clients;
    is(scalar @c, 1, 'unix socket: one gateway connection');
    $u->stop;
}

{
    my $h = $t->nginx('byname');
    $h->write_secret_file('keys', [ [ k1 => $KEY ] ]);
    $h->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://localhost:%%REDIS_PORT%%/6;

    server {
        listen 127.0.0.1:%%PORT_byname%%;
        server_name localhost;
        location / {
            civicgate_journey on;
            civicgate_service by-name;
            return 200 "ok\n";
        }
    }
EOF
    $h->run;
    my $r = $h->request('/', port => $t->port('byname'));
    is($r->status, 200, 'host name: request answered');
    my $j = $r->header('X-Journey-ID');
    ok($t->wait_until(sub {
        $t->redis_query({ db => 6 }, 'EXISTS', "cg:{j:$j}:timeline") }),
        'host name resolved at configuration time: event in db 6');
}

$t->done_testing;
