#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# rediss://: events over TLS with the server certificate verified against
# tls_trusted_certificate and tls_name; a certificate from another CA or
# for another name is refused (logged, requests unaffected, nothing
# written); tls_verify=off accepts it.

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

# a CA, a server certificate for localhost and 127.0.0.1, another CA
$t->write_file("$dir/san.cnf",
    "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
    . "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
    . "extendedKeyUsage=serverAuth\n");
for my $ca (qw(ca other-ca)) {
    ossl("req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
        . " -keyout $ca.key -out $ca.pem -days 2 -subj '/CN=civicgate test $ca'");
}
ossl('req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'
    . " -keyout server.key -out server.csr -subj '/CN=localhost'");
ossl('x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial'
    . ' -out server.pem -days 2 -extfile san.cnf');
chmod 0644, map { "$dir/$_" } qw(ca.pem other-ca.pem server.pem server.key);

my $P = $t->port('redis');
eval {
    $t->run_redis(no_port => 1,
        args => [ '--port', '0', '--tls-port', $P,
            '--tls-cert-file', "$dir/server.pem",
            '--tls-key-file', "$dir/server.key",
            '--tls-ca-cert-file', "$dir/ca.pem",
            '--tls-auth-clients', 'no' ],
        cli_args => [ '--tls', '--cacert', "$dir/ca.pem" ]);
    1;
} or do {
    my $err = $@;
    plan(skip_all => 'redis-server without TLS support')
        if $err =~ /tls|Bad directive/i;
    die $err;
};

my $KEY = random_key_hex(32);

# name => civicgate_redis arguments
my %cases = (
    good     => "rediss://127.0.0.1:$P tls_trusted_certificate=$dir/ca.pem"
              . ' tls_name=localhost',
    byip     => "rediss://127.0.0.1:$P tls_trusted_certificate=$dir/ca.pem",
    wrongca  => "rediss://127.0.0.1:$P tls_trusted_certificate=$dir/other-ca.pem"
              . ' tls_name=localhost',
    wrongname => "rediss://127.0.0.1:$P tls_trusted_certificate=$dir/ca.pem"
              . ' tls_name=other.example',
    noverify => "rediss://127.0.0.1:$P tls_trusted_certificate=$dir/other-ca.pem"
              . ' tls_name=localhost tls_verify=off',
    noverify_nocert => "rediss://127.0.0.1:$P tls_verify=off",
);

my (%inst, %journeys);
for my $name (sort keys %cases) {
    my $n = $t->nginx($name);
    $n->write_secret_file('keys', [ [ k1 => $KEY ] ]);
    $n->write_nginx_conf(<<"EOF");
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis $cases{$name};

    server {
        listen 127.0.0.1:%%PORT_$name%%;
        server_name localhost;
        location /e {
            civicgate_journey on;
            civicgate_channel web;
            return 200 "ok\\n";
        }
        location = /metrics {
            civicgate_metrics;
        }
    }
EOF
    $n->run;
    $inst{$name} = $n;
    my $j = mint_journey_id($KEY);
    $journeys{$name} = $j;
    my $bad = 0;
    for (1 .. 4) {
        my $r = $n->request('/e', port => $t->port($name),
            headers => [ 'X-Journey-ID' => $j ]);
        $bad++ unless $r->status == 200 && $r->header('X-Journey-ID') eq $j;
    }
    is($bad, 0, "$name: 4 requests answered 200");
}

# read over TLS with redis-cli (redis_cmd uses --tls --cacert ca.pem)
sub xlen {
    my ($name) = @_;
    my $v = $t->redis_cmd('LLEN', "cg:{j:$journeys{$name}}:timeline");
    return $v =~ /^\d+$/ ? $v : -1;
}

sub wait_written {
    my ($name) = @_;
    return $t->wait_until(sub { xlen($name) >= 4 }, timeout => 5,
        interval => 0.1);
}

ok(wait_written('good'), 'verified TLS (tls_name=localhost): events written');
is(xlen('good'), 4, 'verified TLS: 4 events in the journey timeline');
like(scalar $t->redis_cmd('LINDEX', "cg:{j:$journeys{good}}:timeline", -1),
    qr/^\d+-\d+ \d{13} /, 'verified TLS: a timeline entry');
is(metric($inst{good}->metrics(port => $t->port('good')),
    'civicgate_events_total', result => 'written'), 4,
    'verified TLS: events_total{result=written} = 4');
{
    my @c = grep { ($_ // '') =~ /name=civicgate-/ }
        $t->redis_cmd('CLIENT', 'LIST');
    my %w = map { ("civicgate-$_" => 1) } $inst{good}->worker_pids;
    is(scalar(grep { /name=(\S+)/ && $w{$1} } @c), 1,
        'verified TLS: the gateway connection is listed');
}

ok(wait_written('byip'), 'default tls_name (the URL host 127.0.0.1, '
    . 'IP SAN): events written');

ok(wait_written('noverify'), 'tls_verify=off with another CA: events written');
ok(wait_written('noverify_nocert'),
    'tls_verify=off without tls_trusted_certificate: events written');

{
    my $w = $inst{wrongca};
    ok($w->wait_for_log(qr/\[error\].*civicgate: redis .*certificate verify error/,
        timeout => 3), 'another CA: error log has "certificate verify error"')
        or diag $w->error_log;
    my $r = $w->request('/e', port => $t->port('wrongca'));
    is($r->status, 200, 'another CA: requests still answered');
    is(xlen('wrongca'), 0, 'another CA: nothing written');
    my $m = $w->metrics(port => $t->port('wrongca'));
    is(metric($m, 'civicgate_events_total', result => 'written'), 0,
        'another CA: events_total{result=written} = 0');
    cmp_ok(metric($m, 'civicgate_events_total', result => 'spooled'), '>=', 4,
        'another CA: the events wait in the spool');
}

{
    my $w = $inst{wrongname};
    ok($w->wait_for_log(qr/\[error\].*civicgate: redis/, timeout => 3),
        'tls_name not in the certificate: refused, logged at [error]')
        or diag $w->error_log;
    is($w->request('/e', port => $t->port('wrongname'))->status, 200,
        'tls_name not in the certificate: requests still answered');
    is(xlen('wrongname'), 0, 'tls_name not in the certificate: nothing written');
}

# connection errors: once at [error], then at [info] until it works again
for my $name (qw(wrongca wrongname)) {
    my $w = $inst{$name};
    my $n = $t->wait_until(sub {
        my @l = grep { /civicgate: redis / } split /\n/, $w->error_log;
        @l >= 3 ? scalar @l : 0;
    }, timeout => 5, interval => 0.1);
    ok($n, "$name: repeated connection attempts fail (logged)");
    my @l = grep { /civicgate: redis / } split /\n/, $w->error_log;
    my @err = grep { /\[error\]/ } @l;
    is(scalar @err, 1, "$name: logged once at [error], then at [info] ("
        . scalar(@l) . ' lines)') or diag join "\n", @l[0 .. ($#l > 5 ? 5 : $#l)];
}

$t->done_testing;
