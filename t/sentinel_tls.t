#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# mode=sentinel over TLS: a server and a Sentinel that only speak TLS
# (port 0, tls-port; the Sentinel reaches the server with TLS too).  With
# rediss:// and tls_verify=on, nginx -t wants tls_name=; with it, the
# gateway verifies the Sentinel's and the server's certificates against
# that name and writes its events; a name the certificates do not carry
# is refused on the Sentinel connections, and nothing is written.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;

my $OPENSSL = '/usr/bin/openssl';
plan(skip_all => 'openssl CLI not found') unless -x $OPENSSL;

my $dir = $t->topdir;

sub ossl {
    my (@args) = @_;
    my $out = `cd '$dir' && '$OPENSSL' @args 2>&1`;
    die "openssl @args failed:\n$out" if $?;
    return $out;
}

$t->write_file("$dir/san.cnf",
    "subjectAltName=DNS:redis.test,IP:127.0.0.1\n"
    . "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
    . "extendedKeyUsage=serverAuth,clientAuth\n");
ossl('req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'
    . " -keyout ca.key -out ca.pem -days 2 -subj '/CN=civicgate test ca'");
ossl('req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'
    . " -keyout server.key -out server.csr -subj '/CN=redis.test'");
ossl('x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial'
    . ' -out server.pem -days 2 -extfile san.cnf');
chmod 0644, map { "$dir/$_" } qw(ca.pem server.pem server.key);

my $server = (grep { -x } map { "$_/redis-server" }
    split(/:/, $ENV{PATH} // ''), '/usr/bin')[0];
$server = $ENV{CIVICGATE_REDIS_SERVER} if $ENV{CIVICGATE_REDIS_SERVER};

my @TLS = ('tls-cert-file', "$dir/server.pem", 'tls-key-file',
    "$dir/server.key", 'tls-ca-cert-file', "$dir/ca.pem",
    'tls-auth-clients', 'no', 'tls-replication', 'yes');
$t->write_secret_file("$dir/keys", [ [ k1 => random_key_hex(32) ] ]);

my $PM = $t->port('tlsm');
my $PS = $t->port('tlss');

$t->run_daemon_logged("$dir/tlsm.log", $server, '--port', '0',
    '--tls-port', $PM, '--bind', '127.0.0.1', '--save', '',
    '--appendonly', 'no', '--dir', $dir, '--protected-mode', 'no',
    map { $_ % 2 ? $TLS[$_] : "--$TLS[$_]" } 0 .. $#TLS);
$t->write_file("$dir/sentinel.conf", join "\n", 'port 0', "tls-port $PS",
    'bind 127.0.0.1', 'protected-mode no', "dir $dir",
    (map { "$TLS[$_ * 2] $TLS[$_ * 2 + 1]" } 0 .. $#TLS / 2),
    "sentinel monitor tm 127.0.0.1 $PM 1",
    'sentinel down-after-milliseconds tm 60000', '');
$t->run_daemon_logged("$dir/sentinel.log", $server, "$dir/sentinel.conf",
    '--sentinel');

# the context's Redis: the server, through redis-cli with TLS
$t->{ctx}{redis} = { port => 'tlsm',
    cli_args => [ '--tls', '--cacert', "$dir/ca.pem" ] };

my $up = $t->wait_until(sub { ($t->redis_cmd('PING') // '') eq 'PONG' },
    timeout => 10);
plan(skip_all => 'redis-server without TLS support')
    if !$up && ($t->read_file("$dir/tlsm.log") // '') =~ /tls|Bad directive/i;
ok($up, 'the server answers over TLS');

sub conf {
    my ($n, $name, $extra) = @_;
    $n->write_nginx_conf(<<"EOF");
    civicgate_secret_file $dir/keys;
    civicgate_redis rediss://127.0.0.1:%%PORT_tlss%% mode=sentinel master=tm
                    tls_trusted_certificate=$dir/ca.pem $extra
                    timeout=500ms connect_timeout=500ms;

    server {
        listen 127.0.0.1:%%PORT_$name%%;
        civicgate_journey on;
        location /ev {
            civicgate_service ev;
            return 200 "ok\\n";
        }
    }
EOF
}

{
    my $n = $t->nginx('notls');
    conf($n, 'notls', '');
    my ($rc, $out) = $n->test_config;
    isnt($rc, 0, 'nginx -t: rediss:// Sentinels with tls_verify=on need'
        . ' tls_name=');
    like($out, qr/requires "tls_name="/, 'says so');
}

conf($t, 0, 'tls_name=redis.test');
$t->run;
is($t->request('/ev')->status, 200, 'a request');
ok($t->wait_until(sub { ($t->redis_cmd('XLEN', 'cg:events') // 0) >= 1 },
    timeout => 5), 'its event is written through a verified Sentinel, on a'
    . ' verified server');

{
    my $b = $t->nginx('wrongname');
    conf($b, 'wrongname', 'tls_name=other.test');
    $b->run;
    ok($b->wait_for_log(qr/certificate does not match "other\.test"/,
        timeout => 5), 'another name: the Sentinel\'s certificate is'
        . ' refused');
    my $before = $t->redis_cmd('XLEN', 'cg:events');
    is($b->request('/ev', port => $t->port('wrongname'))->status, 200,
        'requests are still answered');
    select(undef, undef, undef, 0.5);
    is($t->redis_cmd('XLEN', 'cg:events'), $before,
        'nothing written (0.5 s later)');
    $b->stop;
}

$t->done_testing;
