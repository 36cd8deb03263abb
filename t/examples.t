#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The configurations in examples/ stay valid.  "nginx -t" passes on every
# one of them, with their production paths (/etc, /var, /run) and ports
# moved into the test directory, and the demo's files with their @...@
# placeholders filled in as scripts/demo.sh does.  Then the Redis-over-TLS
# example and the two gateways run against a redis-server set up as the
# example's comments say (TLS with client certificates, the ACL user taken
# from the comment): events, rate limits and consents go through, and the
# two gateways share journeys, consents and limits.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);
use Digest::SHA qw(sha256_hex);
use File::Basename qw(basename dirname);
use File::Path qw(make_path);
use JSON::PP;
use Time::HiRes qw(time);

my $t = Civicgate::Test->new;

my $OPENSSL = '/usr/bin/openssl';
plan(skip_all => 'openssl CLI not found') unless -x $OPENSSL;

my $EX = "$FindBin::Bin/../examples";
my $TOP = $t->topdir;
my $ETC = "$TOP/root/etc";              # /etc of the examples

sub slurp {
    my ($path) = @_;
    open my $fh, '<', $path or die "$path: $!";
    local $/;
    return scalar <$fh>;
}

sub ossl {
    my ($dir, @args) = @_;
    my $out = `cd '$dir' && '$OPENSSL' @args 2>&1`;
    die "openssl @args failed:\n$out" if $?;
}

###########################################################################
# the files the examples name under /etc

# the secret file, with the key IDs of examples/keys.example
my @key_ids = slurp("$EX/keys.example") =~ /^([A-Za-z0-9._-]{1,32})\s+</mg;
is_deeply(\@key_ids, [ qw(2026-06 2026-01 citizens-1) ],
    'keys.example: three placeholder keys, the pseudonym key last');
my %KEY = map { $_ => random_key_hex(32) } @key_ids;
$t->write_file("$ETC/civicgate/keys",
    join('', map { "$_ $KEY{$_}\n" } @key_ids), 0600);

my $REDIS_PW = unpack 'H*', random_bytes(16);
$t->write_file("$ETC/civicgate/redis.pw", "$REDIS_PW\n", 0600);


# a CA, Redis's certificate for redis.internal, the gateways' client
# certificate, and the gateways' own (public) certificate
{
    my $d = "$ETC/civicgate";
    my $ec = '-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes';
    $t->write_file("$d/server.ext", "subjectAltName=DNS:redis.internal\n"
        . "extendedKeyUsage=serverAuth\n");
    $t->write_file("$d/client.ext", "extendedKeyUsage=clientAuth\n");
    ossl($d, "req -x509 $ec -keyout ca.key -out redis-ca.pem -days 2"
        . " -subj '/CN=civicgate example CA'");
    for my $who (qw(server client)) {
        my $cn = $who eq 'server' ? 'redis.internal' : 'civicgate';
        ossl($d, "req $ec -keyout redis-$who.key -out $who.csr"
            . " -subj '/CN=$cn'");
        ossl($d, "x509 -req -in $who.csr -CA redis-ca.pem -CAkey ca.key"
            . " -CAcreateserial -out redis-$who.pem -days 2"
            . " -extfile $who.ext");
    }
    make_path("$ETC/ssl/civicgate");
    ossl("$ETC/ssl/civicgate", "req -x509 $ec -keyout gateway.key"
        . " -out gateway.crt -days 2 -subj '/CN=api.example.go.id'");
    chmod 0644, glob("$d/*.pem"), glob("$d/*.key");
}

# the signing key of agencies.conf, made as docs/signing.md says (after
# the certificates, which are made readable to all)
ossl("$ETC/civicgate", 'genpkey -algorithm ed25519 -out signing-2027-01.pem');
chmod 0600, "$ETC/civicgate/signing-2027-01.pem";

###########################################################################
# rendering an example into an instance directory

my $MODULE = Civicgate::Test->module_path;
my %TEMP = map { ("${_}_temp_path" => 1) }
    qw(client_body proxy fastcgi uwsgi scgi);

# $n: the instance; %o: daemon => 1 to run it under the harness (in the
# foreground), live => { redis => port, backend => port } to run it against
# the test's Redis and backend
sub render {
    my ($n, $text, %o) = @_;
    my $dir = $n->testdir;
    my $name = $n->name;

    # the demo's placeholders, as scripts/demo.sh fills them in
    my %tok = (MODULE => $MODULE, PREFIX => $dir,
        SECRET_FILE => "$ETC/civicgate/keys",
        SIGNING_KEY => "$ETC/civicgate/signing-2027-01.pem", PORT => $t->port("${name}_demo"),
        BACKEND_PORT => $t->port('backend'), REDIS_PORT => $t->redis_port);
    $text =~ s{@([A-Z_]+)@}{
        defined $tok{$1} ? $tok{$1} : die "unknown placeholder \@$1\@\n"
    }ge;

    $text =~ s{^(\s*load_module\s+)\S*/ngx_http_civicgate_module\.so;}
              {$1$MODULE;}m;

    # the harness's pid file and error log
    $text =~ s{^(\s*pid\s+)[^;\s]+;}{$1$dir/nginx.pid;}mg;
    $text =~ s{^(\s*error_log\s+)[^;\s]+}{$1$dir/error.log}mg;

    # production paths into the test directories
    $text =~ s{(?<=[\s=])/etc/}{$ETC/}g;
    $text =~ s{(?<=[\s=])/(var|run)/}{$dir/$1/}g;

    # every listening address to a free loopback port
    my $i = 0;
    $text =~ s{^(\s*listen\s+)([^\s;]+)}{
        my ($pre, $addr) = ($1, $2);
        $addr =~ /^127\.0\.0\.1:\d+$/ ? "$pre$addr"
            : $pre . '127.0.0.1:' . $t->port($name . '_' . $i++)
    }mge;

    # temporary files inside the instance, where the file does not say
    my $temp = '';
    for my $d (sort keys %TEMP) {
        $temp .= "    $d $dir/tmp/$d;\n" unless $text =~ /^\s*\Q$d\E\s/m;
    }
    $text =~ s{^(http\s*\{[^\n]*\n)}{$1$temp}m;

    if (my $live = $o{live}) {
        $text =~ s{^(\s*listen\s+\S+)\s+ssl\b}{$1}mg;
        $text =~ s{(rediss?://(?:[^\s@/]+@)?)[^\s/:]+:\d+}
                  {${1}127.0.0.1:$live->{redis}}g;
        $text =~ s{^(\s*server\s+)\d+\.\d+\.\d+\.\d+:\d+}
                  {${1}127.0.0.1:$live->{backend}}mg;
    }

    # nothing may point outside the test directory (the status page's
    # parameters are URIs on the server, not files)
    for my $line (split /\n/, $text) {
        next if $line =~ /^\s*(#|$|location\b|return\b|proxy_pass\b|')/
            || $line =~ /^\s*civicgate_status_page\b/;
        for my $path ($line =~ m{(?:^|[\s=])(/[^\s;'"]+)}g) {
            die "unmapped path $path in: $line\n"
                unless index($path, $TOP) == 0 || $path eq $MODULE;
            make_path(dirname($path));
        }
    }

    return $text;
}

sub render_file {
    my ($n, $file, %o) = @_;
    my $text = render($n, slurp($file), %o);
    $text = "daemon off;\n$text" if $o{daemon} || $o{live};
    $n->write_file('nginx.conf', $text);

    # included files are rendered next to it, as nginx looks for them
    for my $inc ($text =~ /^\s*include\s+([^\s;\/]+);/mg) {
        $n->write_file($inc, render($n, slurp(dirname($file) . "/$inc"), %o));
    }
    return $text;
}

sub nginx_t_ok {
    my ($n, $what) = @_;
    my ($rc, $out) = $n->test_config(conf => 'nginx.conf');
    my @bad = grep { /\[(emerg|alert|crit|error)\]/
        || (/\[warn\]/ && !/"user" directive makes sense only/) }
        split /\n/, $out;
    ok($rc == 0 && $out =~ /syntax is ok/ && $out =~ /test is successful/
        && !@bad, "$what: nginx -t is successful") or diag $out;
}

###########################################################################
# nginx -t on every configuration

my @confs = sort(glob("$EX/*.conf"), glob("$EX/*/*.conf"));
my (%included, @main);
for my $file (@confs) {
    my $text = slurp($file);
    if ($text =~ /^events\s*\{/m) {
        push @main, $file;
        $included{ dirname($file) . "/$_" } = 1
            for $text =~ /^\s*include\s+([^\s;\/]+);/mg;
    }
}

ok(scalar(@main) >= 6, 'examples: ' . scalar(@main) . ' configurations');
for my $file (@confs) {
    (my $rel = $file) =~ s{^\Q$EX\E/}{};
    ok(grep({ $_ eq $file } @main) || $included{$file},
        "$rel: a configuration, or included by one");
}

my %inst;
for my $file (@main) {
    (my $rel = $file) =~ s{^\Q$EX\E/}{};
    (my $name = $rel) =~ s/\W/_/g;
    my $n = $t->nginx("t_$name");
    my $ok = eval { render_file($n, $file); 1 };
    ok($ok, "$rel: rendered") or diag $@;
    nginx_t_ok($n, $rel) if $ok;
}

{
    my $out = `sh -n '$EX/consumer.sh' 2>&1`;
    is($?, 0, 'consumer.sh: sh -n') or diag $out;
}

# the two gateways differ only above the marked line
{
    my @tail = map {
        my $s = slurp("$EX/two-gateways/gateway-$_.conf");
        $s =~ s/^.*?-- from here on, the same on every gateway --//s
            ? $s : undef;
    } qw(a b);
    ok(defined $tail[0] && defined $tail[1] && $tail[0] eq $tail[1],
        'two gateways: the same server directives and locations');
}

# every service name is a public service of the status: none on the
# consent API or the admin endpoints
for my $file (@confs) {
    (my $rel = $file) =~ s{^\Q$EX\E/}{};
    my @bad;
    for my $body (slurp($file) =~ /^\s*location\b[^{]*\{([^{}]*)\}/mg) {
        next unless $body =~ /^\s*civicgate_(?:consent_api|admin);/m;
        push @bad, $1 while $body =~ /^\s*civicgate_service\s+(\S+);/mg;
    }
    is("@bad", '', "$rel: no service on the consent API or admin endpoints");
}

# the three-agency gateway serves the status endpoint
{
    my $text = slurp("$EX/agencies.conf");
    like($text, qr/^\s*location \/status \{\s*\n\s*civicgate_status;/m,
        'agencies.conf: the status endpoint');
    like($text, qr/^\s*location = \/status-page \{\s*\n\s*civicgate_status_page\s+status=\/status\/;\s*\n\s*civicgate_journey\s+off;/m,
        'agencies.conf: the status page, without journeys');
}

###########################################################################
# live: Redis over TLS with the example's ACL, then two gateways

my $P = $t->port('redis');
my @acl = do {
    my $text = slurp("$EX/redis-tls.conf");
    my ($rules) = $text =~ /^#\s+user civicgate\s+(.*\n(?:#\s+[+~&-].*\n)*)/m;
    $rules //= '';
    $rules =~ s/^#//mg;
    split ' ', $rules;
};
ok(scalar(grep { $_ eq '#SHA256_OF_PASSWORD' } @acl) == 1
    && scalar(grep { /^\+/ } @acl) > 10,
    'redis-tls.conf: the ACL user is in the comment') or diag "@acl";
s/^#SHA256_OF_PASSWORD$/'#' . sha256_hex($REDIS_PW)/e for @acl;

my $cert = "$ETC/civicgate";
my $redis_ok = eval {
    $t->run_redis(no_port => 1,
        args => [ '--port', '0', '--tls-port', $P,
            '--tls-cert-file', "$cert/redis-server.pem",
            '--tls-key-file', "$cert/redis-server.key",
            '--tls-ca-cert-file', "$cert/redis-ca.pem",
            '--tls-auth-clients', 'yes',
            '--user', 'civicgate', @acl ],
        cli_args => [ '--tls', '--cacert', "$cert/redis-ca.pem",
            '--cert', "$cert/redis-client.pem",
            '--key', "$cert/redis-client.key" ]);
    1;
};
if (!$redis_ok) {
    my $err = $@;
    die $err unless $err =~ /tls|Bad directive/i;
    diag 'redis-server without TLS support: live part skipped';
    $t->done_testing;
    exit 0;
}

my %LIVE = (live => { redis => $P, backend => $t->port('backend') });
my $json = JSON::PP->new;
my $C = '3171' . join '', map { int rand 10 } 1 .. 12;
my $PSEUDONYM = pseudonym($KEY{'citizens-1'}, $C);

# the demo's agency backend: echoes what the gateway told it
my $backend = $t->nginx('backend');
render_file($backend, "$EX/backend.conf", daemon => 1);
$backend->run;

sub get {
    my ($n, $port, $path, %o) = @_;
    return $n->request($path, port => $t->port($port), %o);
}

sub echo {
    my ($r) = @_;
    return eval { $json->decode($r->body // '') } || {};
}

{
    my $n = $t->nginx('tls');
    render_file($n, "$EX/redis-tls.conf", %LIVE);
    $n->run;
    my @h = ('X-Channel' => 'app', 'X-Citizen-Id' => $C);
    my $path = '/api/health-records/visits';

    my $r = get($n, 'tls_0', $path, headers => \@h);
    is($r->status, 403, 'TLS: no consent yet: 403 (consent read over TLS)')
        or diag $r->raw;
    my $J = $r->header('X-Journey-ID') // '';

    $r = get($n, 'tls_0', '/consents/health_records', method => 'PUT',
        headers => [ @h, 'X-Journey-ID' => $J,
            'Content-Type' => 'application/json' ], body => '{}');
    is($r->status, 201, 'TLS: consent granted through the consent API')
        or diag $r->raw;

    $r = get($n, 'tls_0', $path, headers => [ @h, 'X-Journey-ID' => $J ]);
    is($r->status, 200, 'TLS: with consent: 200 from the agency')
        or diag $r->raw;
    my $e = echo($r);
    is_deeply([ @$e{qw(service channel journey_id citizen)},
        $e->{raw_citizen_id_received} ? 1 : 0 ],
        [ 'health-records', 'app', $J, $PSEUDONYM, 0 ],
        'TLS: the agency gets service, channel, journey, pseudonym only');

    ok($t->wait_until(sub {
        ($t->redis_cmd('LLEN', "cg:{j:$J}:timeline") // '') =~ /^(\d+)$/
            && $1 >= 3 }, timeout => 5),
        'TLS: the journey events are in Redis');

    my $m = $n->metrics(port => $t->port('tls_0'));
    is(metric($m, 'civicgate_limit_requests_total', zone => 'citizen',
        result => 'passed'), 2, 'TLS: the rate limit was decided in Redis');
    is(metric($m, 'civicgate_limit_fallbacks_total') // 0, 0,
        'TLS: no limit fell back to local state');

    my %w = map { ("civicgate-$_" => 1) } $n->worker_pids;
    my @conns = grep { /name=(\S+)/ && $w{$1} }
        $t->redis_cmd('CLIENT', 'LIST');
    ok(@conns >= 2 * keys %w && !grep({ !/ user=civicgate / } @conns),
        'TLS: every connection of the gateway is the ACL user civicgate')
        or diag join "\n", @conns;

    unlike($n->error_log, qr/NOPERM|refused|civicgate: redis/,
        'TLS: no refusal and no Redis error in the error log');

    # the example consumer reads the events over TLS
    local $ENV{REDIS_PORT} = $P;
    local $ENV{REDIS_CLI_OPTS} = "--tls --cacert $cert/redis-ca.pem"
        . " --cert $cert/redis-client.pem --key $cert/redis-client.key";
    local @ENV{qw(GROUP START ONCE BLOCK CONSUMER)} = qw(examples 0 1 500 t);
    my $out = `timeout 20 sh '$EX/consumer.sh' 2>&1`;
    like($out, qr/journey=\Q$J\E .*service=health-records/,
        'consumer.sh reads the journey events') or diag $out;
}

# two gateways, one Redis
{
    my %gw;
    for my $x (qw(a b)) {
        my $n = $gw{$x} = $t->nginx("gw_$x");
        render_file($n, "$EX/two-gateways/gateway-$x.conf", %LIVE);
        $n->run;
    }
    my $C2 = $C . '2';
    my @h = ('X-Channel' => 'web', 'X-Citizen-Id' => $C2);
    my $path = '/api/civil-registry/records';

    my $r = get($gw{a}, 'gw_a_0', $path, headers => \@h);
    my $J = $r->header('X-Journey-ID') // '';
    is($r->status, 403, 'gateway A: no consent: 403');
    ok($J =~ journey_id_re() && ($r->header('Set-Cookie') // '') =~ /\Q$J\E/,
        'gateway A: journey minted');

    $r = get($gw{b}, 'gw_b_0', $path, headers => [ @h, 'X-Journey-ID' => $J ]);
    is($r->header('X-Journey-ID'), $J, 'gateway B: the same journey');
    ok(!defined $r->header('Set-Cookie'), 'gateway B: nothing minted');

    $r = get($gw{a}, 'gw_a_0', '/consents/population_records',
        method => 'PUT', headers => [ @h, 'X-Journey-ID' => $J ], body => '');
    is($r->status, 201, 'gateway A: consent granted') or diag $r->raw;

    $r = get($gw{b}, 'gw_b_0', $path, headers => [ @h, 'X-Journey-ID' => $J ]);
    is($r->status, 200, 'gateway B: the consent holds') or diag $r->raw;
    is(echo($r)->{citizen}, pseudonym($KEY{'citizens-1'}, $C2),
        'gateway B: the same pseudonym');

    # A caches the grant for 5 s; a withdrawal through B evicts it
    is(get($gw{a}, 'gw_a_0', $path, headers => \@h)->status, 200,
        'gateway A: the consent holds (and is cached)');
    $r = get($gw{b}, 'gw_b_0', '/consents/population_records',
        method => 'DELETE', headers => \@h);
    is($r->status, 200, 'gateway B: consent withdrawn') or diag $r->raw;
    my $t0 = time;
    ok($t->wait_until(sub {
        get($gw{a}, 'gw_a_0', $path, headers => \@h)->status == 403 },
        timeout => 3, interval => 0.02),
        sprintf('gateway A: refused %.2f s after the withdrawal on B '
            . '(cache ttl 5 s)', time - $t0));

    # 30r/m, burst 10 per citizen, shared: 24 requests alternating
    my $C3 = $C . '3';
    my %st;
    my $t1 = time;
    for my $i (1 .. 24) {
        my $x = $i % 2 ? 'a' : 'b';
        my $s = get($gw{$x}, "gw_${x}_0", $path, headers =>
            [ 'X-Channel' => 'web', 'X-Citizen-Id' => $C3 ])->status;
        $st{$x}{$s == 429 ? 'rejected' : 'passed'}++;
    }
    my $elapsed = time - $t1;
    my $passed = ($st{a}{passed} // 0) + ($st{b}{passed} // 0);
    my $most = 11 + int($elapsed / 2) + 1;
    ok($passed >= 11 && $passed <= $most && $st{a}{rejected}
        && $st{b}{rejected},
        "shared limit: $passed of 24 passed in " . sprintf('%.1f', $elapsed)
        . " s (at most $most; 22 if each gateway limited alone)")
        or diag explain \%st;

    for my $x (qw(a b)) {
        unlike($gw{$x}->error_log, qr/NOPERM|refused|civicgate: redis/,
            "gateway $x: no Redis error in the error log");
    }
}

# some refusals go unlogged by the gateways (the subscriber's PING): Redis
# records every one
{
    ok($t->wait_until(sub {
        grep { /name=civicgate-\d+ .* sub=1 .* cmd=ping / }
            $t->redis_cmd('CLIENT', 'LIST') }, timeout => 5),
        'the consent subscriptions are kept alive with PING');
    my @log = $t->redis_cmd('ACL', 'LOG');
    ok(!grep({ $_ eq 'civicgate' } @log),
        'the ACL user was never refused a command (ACL LOG)')
        or diag join ' ', @log;
}

$t->done_testing;
