package Civicgate::Test;

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

=head1 NAME

Civicgate::Test - black-box test harness for the civicgate nginx module

=head1 SYNOPSIS

    use lib 't/lib';
    use Test::More;
    use Civicgate::Test qw(:all);

    my $t = Civicgate::Test->new;            # skip_all if nginx is missing
    my $key = random_key_hex(32);
    $t->write_secret_file('keys', [ [ k1 => $key ] ]);
    $t->write_nginx_conf(<<'EOF');
        civicgate_secret_file %%TESTDIR%%/keys;
        server {
            listen 127.0.0.1:%%PORT_0%%;
            location / { civicgate_journey on; return 200 "ok\n"; }
        }
    EOF
    $t->run;

    my $r = $t->request('/');                # parsed response, port 0
    is($r->status, 200);
    ok(defined verify_journey_id($r->header('X-Journey-ID'), $key));

    $t->done_testing;                        # error.log checks + cleanup

=head1 DESCRIPTION

Only core Perl modules are used.  Every test file gets a private temporary
directory (kept, and its path printed, when C<CIVICGATE_TEST_LEAVE=1>).
Everything that is started (nginx masters, redis-server, daemons) is tracked
by pid and stopped when the test ends, also when it dies.

Environment:

    CIVICGATE_TEST_LEAVE=1   keep the temporary directory
    CIVICGATE_NGINX          nginx binary (default /usr/sbin/nginx)
    CIVICGATE_MODULE         module .so (default <repo>/build/ngx_http_civicgate_module.so)
    CIVICGATE_REDIS_SERVER   redis-server binary (default: from PATH)
    CIVICGATE_REDIS_CLI      redis-cli binary (default: from PATH)
    CIVICGATE_SANITIZER      set by make test-asan: nginx is built with
                             sanitizers; their reports fail check_logs

C<new> calls C<skip_all> only when nginx or redis-server is missing.  A
module that is missing or fails to load is a failure, never a skip.

=head1 OBJECTS AND INSTANCES

    my $t = Civicgate::Test->new(%opts);

Creates the test context: the top temporary directory, the port allocator,
Redis and daemon bookkeeping, and the first nginx instance, whose prefix is
the top directory itself.  Options: C<redis =E<gt> 0> to not require
redis-server (default: required, i.e. skip_all if missing), C<nginx =E<gt>
0> to not require nginx (a test of Redis alone).

    my $b = $t->nginx('b');

Another nginx instance sharing ports, Redis and daemons with C<$t>; its
prefix (C<testdir>) is C<TOPDIR/b>.  All nginx methods below work on any
instance.  C<$t-E<gt>nginx('b')> returns the same object when called again.

=head2 Files and configuration

    $t->testdir                  instance prefix directory (absolute)
    $t->topdir                   top temporary directory (shared)
    $t->write_file($name, $content [, $mode])      returns the absolute path
    $t->write_secret_file($name, [ [id, hex], ... ] [, extra_text])
    $t->write_file_expand($name, $template)        expands tokens, returns path
    $t->expand($template)                          returns the expanded text
    $t->nginx_conf($http_block, %globals)          returns a template
    $t->write_nginx_conf($http_block, %globals)    = write_file_expand('nginx.conf', nginx_conf(...))
    $t->read_file($name)                           relative to testdir, or absolute
    $t->conf_line($regex [, $file])                1-based line of the first match in the
                                                   expanded config file (default nginx.conf)
    $t->config_fails($name, $http_block, like => $re, line => $re)
                            writes nginx.conf, runs "nginx -t" and adds one
                            subtest "nginx -t fails: $name": non-zero exit,
                            an [emerg] that matches like, pointing at the
                            line of nginx.conf that matches line
    $t->config_ok($name, $http_block)
                            writes nginx.conf; one test of that name:
                            "nginx -t" exits 0 (its output in a diag if not)

Tokens: C<%%TESTDIR%%> (instance prefix), C<%%TOPDIR%%>, C<%%PORT_N%%> (port
with logical index/name N, C<\w+>), C<%%MODULE%%>, C<%%REDIS_PORT%%>
(= C<port('redis')>).  An unknown C<%%TOKEN%%> dies.

C<nginx_conf> globals: C<worker_processes> (1), C<master_process> ('on'),
C<error_log_level> ('info'), C<worker_connections> (1024), C<user> (default:
none, i.e. nginx's default C<nobody>; the test directory is made world
readable for that reason), C<main> (extra main-context text), C<events>
(extra events text), C<load_module> (0 to leave it out).

Configuration snippets (exported functions; text for a server block or,
for backend_server, the http block, indented as in the tests):

    api_locations(@what [, { heartbeat => '1s' }])
                            the locations of the gateway's own endpoints,
                            each with civicgate_events off; @what of
                            consents (/consents/, civicgate_consent_api),
                            status (/status/, civicgate_status, and
                            civicgate_status_heartbeat if given), admin
                            (/civicgate/admin/), metrics (= /metrics)
    backend_server($port)   a server on %%PORT_$port%% answering 200
                            "backend" to everything, civicgate_journey off
    limit_location($path, $zone => $burst, ...)
                            location = $path with one civicgate_limit
                            zone=Z burst=B nodelay per pair, serving
                            %%TESTDIR%%/file.txt

=head2 Processes

    $t->run(wrapper => [..]) runs nginx under a wrapper such as valgrind
    $t->run                 start nginx (fork/exec, daemon off); waits for the pid
                            file and for every "listen" port of nginx.conf; dies
                            (failing the test) with stderr/error.log if nginx
                            exits or is not ready within 10 s.
    $t->stop                QUIT, wait up to 5 s, TERM, 2 s, KILL.
    $t->reload              HUP; waits until the old workers are gone or
                            "shutting down" and the new workers run.  Returns 1,
                            or 0 when the reload failed (e.g. [emerg]; remember
                            allow_log for such a test) or timed out.
    $t->test_config         runs "nginx -t"; returns (exit code, output) where
                            output is stdout+stderr.  Its own startup log goes
                            to nginx-t.log; these logs are not checked.
    $t->pid                 master pid or undef
    $t->worker_pids         pids of the master's current children

    $t->port($n)            free 127.0.0.1 TCP port for logical index/name $n;
                            stable within the test, random, below the
                            ephemeral range, held by a lock file so that
                            parallel prove jobs don't collide.

    $t->run_redis(%o)       start redis-server on port('redis') (or o{port}, a
                            logical name) with --save '' --appendonly no --dir
                            TOPDIR --bind 127.0.0.1 --protected-mode no
                            --daemonize no --pidfile/--logfile in TOPDIR.
                            o{args}: extra server args; o{cli_args}: extra
                            redis-cli args used for readiness and redis_cmd
                            (e.g. --user/--pass, --tls ...); o{no_port}: do not
                            pass --port (when args configure it, e.g. TLS).
                            Waits for PING -> PONG (10 s).  Repeatable after
                            stop_redis, on the same port and with the same
                            options unless new ones are given.
                            o{auth}: [user, password] (or [password]) that
                            redis_query and friends send first.
    $t->stop_redis          TERM, wait up to 5 s, KILL.
    $t->redis_pid, $t->redis_port
    $t->redis_cmd(@args)    runs redis-cli -h 127.0.0.1 -p PORT --raw CLI_ARGS
                            @args.  --raw: replies are printed bare, one
                            element per line, no quoting or "(integer)"
                            prefixes; errors come out as "ERR ..." lines.
                            Scalar context: the whole output, chomped; list
                            context: the lines.

    A small RESP client (plain TCP or a unix socket, no TLS), exact replies:
    simple/bulk strings as strings, integers as numbers, nil as undef,
    arrays as array refs, errors as Civicgate::Test::RedisError objects
    (->message, stringify to the message; test with is_redis_error($x)).
    Every method takes an optional leading hash ref of connection options:
    { db => N, auth => [user, pass], port => P, unix => PATH, timeout => s }
    (default: the run_redis port and auth; auth => undef: none).  Connection failures croak.

    $t->redis_query([\%o,] @args)          one command, its reply
    $t->redis_pipeline([\%o,] [@cmd], ...) several commands on one connection,
                                            the list of replies
    $t->redis_scan_keys([\%o,] [$match])   every key (SCAN), sorted
    $t->redis_stream([\%o,] $key)          XRANGE key - +: array ref of
                            { id, fields => [f, v, ...], names => [f, ...],
                              f => { f => v } } in stream order
    $t->redis_hash([\%o,] $key)            HGETALL as a hash ref
    $t->journey_timeline([\%o,] $journey)  the journey's timeline list:
                            array ref of { id => SID, f => { sid, time,
                              channel, service, status, method, latency_ms,
                              eid, citizen, journey }, fields, raw }
    $t->journey_length([\%o,] $journey)    LLEN of the timeline (0 if none)
    $t->journey_summary([\%o,] $journey)   first_seen, last_seen, channels,
                            events, last_* and citizen, derived from it
    $t->redis_clients([\%o])               CLIENT LIST: list of hash refs
                                            (id, addr, name, db, user, cmd ...)

    $t->wait_until($code, timeout => 5, interval => 0.05)
                            calls $code until it returns true; returns that
                            value, or undef at the timeout

    $t->run_daemon(@cmd)    fork/exec @cmd (or run a code ref in the child:
                            run_daemon(sub { ... })); stdout/stderr go to
                            TOPDIR/daemon-N.log (N counts from 1); returns the pid.
    $t->run_daemon_logged($logname, @cmd)   same, output to that file
                            (relative to testdir)
    $t->stop_daemon($pid)   CONT, TERM, 3 s, KILL.
    $t->forget_daemon($pid) no longer stop it at the end (the caller
                            killed and reaped it)
    $t->run_stalled_peer($port [, $accepts_log])
                            a peer that accepts and reads but never answers
                            (a stalled Redis); one line per accepted
                            connection (its time) in $accepts_log if given;
                            waits until it listens; returns the pid
    $t->wait_port($port [, $timeout])   until 127.0.0.1:port accepts

=head2 Logs

    $t->error_log           the whole error.log text of the instance
    $t->access_log          the whole access.log text
    $t->log_mark            current size of error.log (an offset)
    $t->log_since($mark)    error.log text after the offset
    $t->wait_for_log($re, timeout => 3, since => $mark [, file => 'access.log'])
                            polls until the log matches; returns the match or undef
    $t->allow_log($re)      an [alert]/[emerg]/[crit] line matching $re is
                            not an error for the final check
    $t->check_logs          adds one test per run instance: no [alert],
                            [emerg], [crit], "exited on signal" line in its
                            error.log (from the first run on).  Called once
                            by done_testing (after stopping everything) and,
                            if the test never got there, from END.
    $t->done_testing        stops everything, check_logs, Test::More::done_testing

=head2 HTTP

Exported functions (all over a raw IO::Socket::INET with an alarm, 8 s by
default; they return the full raw response, or undef on timeout/connect error
with a diag):

    http($raw_request, port => $p, timeout => 8, parts => [...], delay => 0.1)
                 sends the request (or, with parts, each part after delay s)
                 and reads until EOF.
    http_get($path, port => $p, headers => [ Name => value, ... ] | { ... },
             version => '1.1' | '1.0', method => 'GET', body => undef,
             host => 'localhost')
                 HTTP/1.1 adds "Connection: close"; header values are sent
                 as given (so CR/LF/NUL can be injected).
    parse_response($raw) -> Civicgate::Test::Response
                 ->status (0 if no response), ->version, ->reason,
                 ->header($name) (values joined with ", ", undef if absent),
                 ->header_list($name), ->headers (hash: lowercased name =>
                 [values]), ->body (de-chunked), ->raw

Methods with the port defaulting to C<port(0)>:

    $t->http_get($path, %o)      raw text
    $t->http($raw, %o)           raw text (alias: $t->raw_http)
    $t->request($path, %o)       parse_response(http_get(...))
    $t->citizen_request($path, $citizen, method => 'GET', channel => 'web',
                        journey => $jid, body => $text, %o)
                                 request() with X-Citizen-Id, X-Channel and
                                 (if given) X-Journey-ID

    http_burst(\@raw_requests, port => $p, timeout => 10)   (function)
                 opens one connection per request at once, sends them all,
                 reads with select until every peer closed or the timeout;
                 returns the raw responses (undef where none), same order.

    my $job = $t->start_load(clients => 2, requests => 100, interval => 0.02,
                             path => '/x' | sub { ($client, $i) -> path },
                             headers => [...] | sub { ($client, $i) -> [...] },
                             method => 'GET', port => port(0), timeout => 5)
                 forks the clients (tracked like daemons) and returns at once;
                 each client sends its requests one after the other.
    my $res = $t->wait_load($job, timeout => 60)
                 waits for the clients (killed at the timeout) and returns
                 { answered => number of 200s, statuses => { code => n },
                   max_elapsed => s, elapsed => s, results => [ { client, i,
                   status (0: no response), start, elapsed, journey
                   (X-Journey-ID), body (first line) }, ... ] }
    my $sum = $t->load_gateways({ name => port, ... }, %start_load_options)
                 the same load on every port at once (2 clients, 10 ms
                 apart unless said otherwise), waited for; returns
                 { total => 200s, admitted => { name => 200s },
                   statuses => { code => n }, span => s from the first
                   request's start to the last one's end }

    $t->metrics(path => '/metrics', port => ...)   parse_metrics of the body
    parse_metrics($text)         { 'name{l="v",...}' => value } (also 'name' for
                                 unlabelled series)
    metric($hash, $name, %labels)  sum of the series of $name whose labels
                                 include %labels (0 if none); undef if no
                                 series of $name matches at all

=head2 Independent computations (exported)

    hkdf_sha256($ikm, $info, $len [, $salt])  RFC 5869, empty salt by default
    journey_subkey($key_bytes), citizen_subkey($key_bytes)
    pseudonym($hexkey, $raw_citizen)   32 lowercase hex digits
    crockford_encode($bytes, $nbits)   MSB first, uppercase, no hyphens
    crockford_decode($symbols)         bytes (zero padded); undef if not base32
    canonical_journey_id($input)       spec input rules -> 'XXXXX-XXXXX-XXXXX-XXXXX' or undef
    mint_journey_id($hexkey [, $unique8])  a valid journey ID for that key
    verify_journey_id($id, @hexkeys)   index of the first key the ID verifies under, or undef
    journey_id_re                      qr/^[0-9A-HJKMNP-TV-Z]{5}(-...){3}$/ canonical
    random_key_hex($nbytes = 32), random_bytes($n)

=cut

use strict;
use warnings;

use Carp qw(croak);
use Cwd qw(abs_path);
use Digest::SHA qw(hmac_sha256 sha256);
use Exporter qw(import);
use Fcntl qw(:flock);
use File::Basename qw(dirname);
use File::Path qw(make_path);
use File::Spec;
use File::Temp qw(tempdir);
use IO::Socket::INET;
use POSIX qw(:sys_wait_h);
use Socket qw(SOL_SOCKET SO_REUSEADDR);
use Test::More ();
use Time::HiRes qw(sleep time);

our $VERSION = '0.01';

our @EXPORT_OK = qw(
    http http_get http_burst parse_response parse_metrics metric
    is_redis_error api_locations backend_server limit_location
    hkdf_sha256 journey_subkey citizen_subkey pseudonym
    crockford_encode crockford_decode canonical_journey_id
    mint_journey_id verify_journey_id journey_id_re
    random_key_hex random_bytes
);
our %EXPORT_TAGS = (all => \@EXPORT_OK);

my $REPO = abs_path(dirname(__FILE__) . '/../../..');

our $NGINX  = $ENV{CIVICGATE_NGINX}  || '/usr/sbin/nginx';
our $MODULE = $ENV{CIVICGATE_MODULE}
    || "$REPO/build/ngx_http_civicgate_module.so";
our $REDIS_SERVER = $ENV{CIVICGATE_REDIS_SERVER} || _which('redis-server');
our $REDIS_CLI    = $ENV{CIVICGATE_REDIS_CLI}    || _which('redis-cli');

# a line of an AddressSanitizer, LeakSanitizer or UBSan report
my $SANITIZER_RE = qr/ERROR: (?:Address|Leak)Sanitizer|runtime error:/;

my @CONTEXTS;       # every context created in this process, for END
my $CREATOR = $$;

sub _which {
    my ($prog) = @_;
    for my $d (split /:/, $ENV{PATH} || '/usr/bin:/bin', -1) {
        next unless length $d;
        return "$d/$prog" if -x "$d/$prog";
    }
    for my $d (qw(/usr/local/bin /usr/bin /usr/sbin /bin)) {
        return "$d/$prog" if -x "$d/$prog";
    }
    return undef;
}

###########################################################################
# construction

sub new {
    my ($class, %opt) = @_;

    Test::More::plan(skip_all => "nginx binary $NGINX not found")
        unless -x $NGINX || !($opt{nginx} // 1);
    Test::More::plan(skip_all => 'redis-server not found')
        if (!defined $REDIS_SERVER || !-x $REDIS_SERVER)
            && ($opt{redis} // 1);

    my $leave = $ENV{CIVICGATE_TEST_LEAVE} ? 1 : 0;
    my $top = tempdir('civicgate-test-XXXXXXXX', TMPDIR => 1,
        CLEANUP => !$leave);
    $top = abs_path($top);
    # workers run as nobody when the tests run as root
    chmod 0755, $top;
    Test::More::diag("test directory kept: $top") if $leave;

    my $ctx = {
        topdir    => $top,
        ports     => {},
        locks     => [],
        daemons   => {},
        redis     => undef,
        instances => {},
        order     => [],
        checked   => 0,
        owner     => $$,
    };
    push @CONTEXTS, $ctx;

    return _instance($class, $ctx, 'main', $top);
}

sub _instance {
    my ($class, $ctx, $name, $dir) = @_;
    my $self = bless {
        ctx        => $ctx,
        name       => $name,
        dir        => $dir,
        pid        => undef,
        conf       => 'nginx.conf',
        log_start  => undef,
        allow      => [],
        was_run    => 0,
    }, $class;
    $ctx->{instances}{$name} = $self;
    push @{ $ctx->{order} }, $name;
    return $self;
}

sub nginx {
    my ($self, $name) = @_;
    croak 'nginx(NAME) needs a name' unless defined $name && length $name;
    my $ctx = $self->{ctx};
    return $ctx->{instances}{$name} if $ctx->{instances}{$name};
    croak "bad instance name $name" unless $name =~ /^\w+$/;
    my $dir = "$ctx->{topdir}/$name";
    make_path($dir);
    chmod 0755, $dir;
    return _instance(ref $self, $ctx, $name, $dir);
}

sub testdir { $_[0]{dir} }
sub topdir  { $_[0]{ctx}{topdir} }
sub name    { $_[0]{name} }
sub module_path { $MODULE }
sub nginx_binary { $NGINX }

###########################################################################
# ports

sub _port_range {
    my ($lo, $hi) = (10000, 30000);
    if (open my $fh, '<', '/proc/sys/net/ipv4/ip_local_port_range') {
        my ($elo) = split ' ', scalar <$fh>;
        if (defined $elo && $elo > 12000) {
            $hi = $elo - 1;
        } elsif (defined $elo) {
            # ephemeral range starts low: use the top of the port space
            ($lo, $hi) = (61000, 65000);
        }
    }
    return ($lo, $hi);
}

sub port {
    my ($self, $n) = @_;
    $n //= 0;
    my $ctx = $self->{ctx};
    return $ctx->{ports}{$n} if exists $ctx->{ports}{$n};

    my $lockdir = File::Spec->tmpdir . '/civicgate-test-ports';
    make_path($lockdir);
    chmod 01777, $lockdir;
    my ($lo, $hi) = _port_range();
    my %taken = map { $_ => 1 } values %{ $ctx->{ports} };

    for (1 .. 2000) {
        my $p = $lo + int(rand($hi - $lo + 1));
        next if $taken{$p};
        open my $fh, '>>', "$lockdir/$p.lock" or next;
        unless (flock($fh, LOCK_EX | LOCK_NB)) {
            close $fh;
            next;
        }
        my $s = IO::Socket::INET->new(
            LocalAddr => '127.0.0.1',
            LocalPort => $p,
            Proto     => 'tcp',
            Listen    => 1,
            ReuseAddr => 0,
        );
        unless ($s) {
            close $fh;
            next;
        }
        close $s;
        push @{ $ctx->{locks} }, $fh;
        $ctx->{ports}{$n} = $p;
        return $p;
    }
    croak 'no free port found';
}

sub wait_port {
    my ($self, $port, $timeout) = @_;
    my $end = time + ($timeout // 10);
    while (time < $end) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $port, Proto => 'tcp', Timeout => 1);
        if ($s) {
            close $s;
            return 1;
        }
        sleep 0.05;
    }
    return 0;
}

###########################################################################
# files

sub _path {
    my ($self, $name) = @_;
    return $name if File::Spec->file_name_is_absolute($name);
    return "$self->{dir}/$name";
}

sub write_file {
    my ($self, $name, $content, $mode) = @_;
    my $path = $self->_path($name);
    make_path(dirname($path));
    open my $fh, '>', $path or croak "write $path: $!";
    binmode $fh;
    print $fh $content;
    close $fh or croak "close $path: $!";
    chmod(defined $mode ? $mode : 0644, $path);
    return $path;
}

sub read_file {
    my ($self, $name) = @_;
    my $path = $self->_path($name);
    open my $fh, '<', $path or return undef;
    binmode $fh;
    local $/;
    my $c = <$fh>;
    return $c // '';
}

sub write_secret_file {
    my ($self, $name, $keys, $extra) = @_;
    my $text = '';
    for my $k (@$keys) {
        $text .= "$k->[0] $k->[1]\n";
    }
    $text .= $extra if defined $extra;
    return $self->write_file($name, $text, 0644);
}

sub expand {
    my ($self, $text) = @_;
    $text =~ s{%%(\w+)%%}{$self->_token($1)}ge;
    return $text;
}

sub _token {
    my ($self, $tok) = @_;
    return $self->{dir}                if $tok eq 'TESTDIR';
    return $self->{ctx}{topdir}        if $tok eq 'TOPDIR';
    return $MODULE                     if $tok eq 'MODULE';
    return $self->port('redis')        if $tok eq 'REDIS_PORT';
    return $self->port($1)             if $tok =~ /^PORT_(\w+)$/;
    croak "unknown template token %%${tok}%%";
}

sub write_file_expand {
    my ($self, $name, $template) = @_;
    return $self->write_file($name, $self->expand($template));
}

sub nginx_conf {
    my ($self, $http, %g) = @_;
    my $wp   = $g{worker_processes}   // 1;
    my $mp   = $g{master_process}     // 'on';
    my $lvl  = $g{error_log_level}    // 'info';
    my $wc   = $g{worker_connections} // 1024;
    my $main = $g{main}   // '';
    my $ev   = $g{events} // '';
    my $lm   = ($g{load_module} // 1) ? "load_module %%MODULE%%;\n" : '';
    my $user = defined $g{user} ? "user $g{user};\n" : '';
    $http //= '';

    return <<"EOF";
${lm}daemon off;
master_process $mp;
worker_processes $wp;
${user}pid %%TESTDIR%%/nginx.pid;
error_log %%TESTDIR%%/error.log $lvl;
$main
events {
    worker_connections $wc;
$ev
}

http {
    access_log %%TESTDIR%%/access.log;
    client_body_temp_path %%TESTDIR%%/client_body_temp;
    proxy_temp_path %%TESTDIR%%/proxy_temp;
    fastcgi_temp_path %%TESTDIR%%/fastcgi_temp;
    uwsgi_temp_path %%TESTDIR%%/uwsgi_temp;
    scgi_temp_path %%TESTDIR%%/scgi_temp;
    default_type text/plain;

$http
}
EOF
}

sub write_nginx_conf {
    my ($self, $http, %g) = @_;
    my $name = delete $g{file} // 'nginx.conf';
    return $self->write_file_expand($name, $self->nginx_conf($http, %g));
}

sub conf_line {
    my ($self, $re, $file) = @_;
    my $text = $self->read_file($file // $self->{conf});
    croak 'no config file' unless defined $text;
    my $n = 0;
    for my $line (split /\n/, $text, -1) {
        $n++;
        return $n if $line =~ $re;
    }
    return undef;
}

# "nginx -t" of a configuration that must fail: one subtest, its name
# "nginx -t fails: $name"; the [emerg] is to name the problem ($o{like})
# and point at the line matching $o{line}
sub config_fails {
    my ($self, $name, $http, %o) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    $self->write_nginx_conf($http);
    my ($rc, $out) = $self->test_config;
    my $ln = $self->conf_line($o{line}) // '?';
    my $conf = $self->testdir . '/nginx.conf';
    return Test::More::subtest("nginx -t fails: $name" => sub {
        Test::More::isnt($rc, 0, 'non-zero exit');
        Test::More::like($out, qr/\[emerg\]/, '[emerg]');
        Test::More::like($out, $o{like}, 'says what is wrong');
        Test::More::like($out, qr/ in \Q$conf\E:$ln\b/,
            "points at nginx.conf:$ln");
    });
}

# "nginx -t" of a configuration that must pass: one test of that name
sub config_ok {
    my ($self, $name, $http) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    $self->write_nginx_conf($http);
    my ($rc, $out) = $self->test_config;
    return Test::More::is($rc, 0, $name) || Test::More::diag($out);
}

###########################################################################
# configuration snippets (server level, 8 spaces in)

my %API_LOCATION = (
    consents => [ '/consents/', 'civicgate_consent_api;' ],
    status   => [ '/status/', 'civicgate_status;' ],
    admin    => [ '/civicgate/admin/', 'civicgate_admin;' ],
    metrics  => [ '= /metrics', 'civicgate_metrics;' ],
);

# the gateway's own endpoints, journey events off: @what of consents,
# status, admin, metrics; a last hash ref { heartbeat => '1s' } for status
sub api_locations {
    my (@what) = @_;
    my %o = ref $what[-1] eq 'HASH' ? %{ pop @what } : ();
    my $text = '';
    for my $w (@what) {
        my $l = $API_LOCATION{$w} or croak "api_locations: $w?";
        $text .= "        location $l->[0] {\n"
            . "            civicgate_events off;\n"
            . "            $l->[1]\n";
        $text .= "            civicgate_status_heartbeat $o{heartbeat};\n"
            if $w eq 'status' && $o{heartbeat};
        $text .= "        }\n";
    }
    return $text;
}

# an upstream answering 200 "backend" everywhere, no journey of its own
sub backend_server {
    my ($port) = @_;
    return <<"EOF";
    server {
        listen 127.0.0.1:%%PORT_$port%%;
        civicgate_journey off;
        location / { return 200 "backend\\n"; }
    }
EOF
}

# a location limited by zone => burst pairs (nodelay), serving file.txt
sub limit_location {
    my ($path, @limits) = @_;
    my $text = "        location = $path {\n";
    while (my ($zone, $burst) = splice @limits, 0, 2) {
        $text .= "            civicgate_limit zone=$zone burst=$burst"
            . " nodelay;\n";
    }
    return $text . "            alias %%TESTDIR%%/file.txt;\n        }\n";
}

###########################################################################
# nginx processes

sub pid { $_[0]{pid} }

sub _listen_ports {
    my ($self) = @_;
    my $text = $self->read_file($self->{conf}) // '';
    my %p;
    while ($text =~ /^\s*listen\s+(?:127\.0\.0\.1:|localhost:|\[::1\]:|\*:)?(\d+)\b/mg) {
        $p{$1} = 1;
    }
    return sort { $a <=> $b } keys %p;
}

sub _worker_count {
    my ($self) = @_;
    my $text = $self->read_file($self->{conf}) // '';
    return 0 if $text =~ /^\s*master_process\s+off\s*;/m;
    if ($text =~ /^\s*worker_processes\s+(\w+)\s*;/m) {
        return $1 eq 'auto' ? _ncpu() : $1;
    }
    return 1;
}

sub _ncpu {
    my $n = 0;
    if (open my $fh, '<', '/proc/cpuinfo') {
        $n = grep { /^processor\s*:/ } <$fh>;
    }
    return $n || 1;
}

sub _spawn {
    my ($logfile, @cmd) = @_;
    my $pid = fork;
    croak "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        if (defined $logfile) {
            open STDOUT, '>>', $logfile or POSIX::_exit(126);
        } else {
            open STDOUT, '>', '/dev/null';
        }
        open STDERR, '>&', \*STDOUT or POSIX::_exit(126);
        if (ref $cmd[0] eq 'CODE') {
            my $rc = eval { $cmd[0]->(@cmd[1 .. $#cmd]); 0 } // 1;
            POSIX::_exit($rc);
        }
        { exec { $cmd[0] } @cmd; }
        print STDERR "exec $cmd[0]: $!\n";
        POSIX::_exit(127);
    }
    return $pid;
}

# waits up to $timeout for $pid; returns 1 if it exited (status in $?)
sub _wait_exit {
    my ($pid, $timeout) = @_;
    my $end = time + $timeout;
    while (1) {
        my $r = waitpid($pid, WNOHANG);
        return 1 if $r == $pid || $r == -1;
        return 0 if time >= $end;
        sleep 0.02;
    }
}

sub _terminate {
    my ($pid, $first, $grace) = @_;
    return unless $pid;
    kill $first, $pid;
    return if _wait_exit($pid, $grace);
    kill 'TERM', $pid if $first ne 'TERM';
    return if $first ne 'TERM' && _wait_exit($pid, 2);
    kill 'KILL', $pid;
    _wait_exit($pid, 5);
}

sub run {
    my ($self, %o) = @_;
    croak "nginx instance $self->{name} already running" if $self->{pid};
    my $dir = $self->{dir};
    my $conf = $o{conf} // $self->{conf};
    $self->{conf} = $conf;
    croak "no $dir/$conf" unless -f "$dir/$conf";

    unlink "$dir/nginx.pid";
    my $elog = "$dir/error.log";
    $self->{log_start} //= -s $elog // 0;
    $self->{was_run} = 1;

    # e.g. wrapper => ['valgrind', ...]: the same pid, a slower start
    $self->{wrapper} = $o{wrapper} if $o{wrapper};
    my @wrapper = @{ $self->{wrapper} // [] };
    my $pid = _spawn("$dir/stderr.log", @wrapper, $NGINX, '-p', "$dir/",
        '-c', "$dir/$conf", '-e', $elog);
    $self->{pid} = $pid;

    my @ports = $self->_listen_ports;
    my $end = time + ($o{timeout} // 10);
    my $ready = 0;
    while (time < $end) {
        if (waitpid($pid, WNOHANG) == $pid) {
            my $st = $?;
            $self->{pid} = undef;
            croak "nginx ($self->{name}) exited during startup (status $st)\n"
                . $self->_startup_diag;
        }
        my $pidtext = $self->read_file('nginx.pid');
        if (defined $pidtext && $pidtext =~ /^(\d+)/ && $1 == $pid) {
            my $all = 1;
            for my $p (@ports) {
                my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                    PeerPort => $p, Proto => 'tcp', Timeout => 1);
                if ($s) { close $s } else { $all = 0; last }
            }
            # with master_process on, also wait for the workers to exist
            if ($all && $self->_worker_count) {
                my @w = $self->worker_pids;
                $all = 0 unless @w >= $self->_worker_count;
            }
            if ($all) { $ready = 1; last }
        }
        sleep 0.05;
    }
    unless ($ready) {
        my $diag = $self->_startup_diag;
        $self->stop;
        croak "nginx ($self->{name}) not ready within timeout\n$diag";
    }
    return $self;
}

sub _startup_diag {
    my ($self) = @_;
    my $out = $self->read_file('stderr.log') // '';
    my $log = $self->read_file('error.log') // '';
    $log = substr($log, $self->{log_start} // 0);
    my @l = split /\n/, $log;
    @l = @l[-20 .. -1] if @l > 20;
    return "stderr:\n$out\nerror.log (tail):\n" . join("\n", @l) . "\n";
}

sub stop {
    my ($self) = @_;
    my $pid = $self->{pid} or return;
    my @workers = $self->worker_pids;
    _terminate($pid, 'QUIT', $self->{wrapper} ? 60 : 5);
    $self->{pid} = undef;
    # orphaned workers (master killed): make sure none survive
    for my $w (@workers) {
        next unless kill 0, $w;
        next unless _cmdline($w) =~ /^nginx: /;
        kill 'KILL', $w;
    }
    return;
}

sub worker_pids {
    my ($self) = @_;
    my $m = $self->{pid} or return ();
    return _children($m);
}

sub _children {
    my ($ppid) = @_;
    my @c;
    opendir my $dh, '/proc' or return ();
    for my $p (grep { /^\d+$/ } readdir $dh) {
        open my $fh, '<', "/proc/$p/stat" or next;
        my $st = <$fh> // next;
        # pid (comm) state ppid ...
        next unless $st =~ /\)\s+\S+\s+(\d+)/;
        push @c, $p + 0 if $1 == $ppid;
    }
    @c = sort { $a <=> $b } @c;
    return @c;
}

sub _cmdline {
    my ($pid) = @_;
    open my $fh, '<', "/proc/$pid/cmdline" or return '';
    local $/;
    my $c = <$fh> // '';
    $c =~ tr/\0/ /;
    return $c;
}

sub reload {
    my ($self, %o) = @_;
    my $pid = $self->{pid} or croak "nginx ($self->{name}) not running";
    my %old = map { $_ => 1 } $self->worker_pids;
    my $mark = $self->log_mark;
    my $want = $self->_worker_count || 1;
    kill 'HUP', $pid;
    my $end = time + ($o{timeout} // 10);
    while (time < $end) {
        my @now = $self->worker_pids;
        my @new = grep { !$old{$_} } @now;
        my $old_busy = grep {
            $old{$_} && _cmdline($_) !~ /shutting down/
        } @now;
        my $new_workers = grep { _cmdline($_) =~ /worker process/ } @new;
        return 1 if $new_workers >= $want && !$old_busy;
        my $since = $self->log_since($mark);
        if ($since =~ /\[emerg\]/) {
            sleep 0.2;
            return 0;
        }
        sleep 0.05;
    }
    Test::More::diag("reload of nginx ($self->{name}) timed out");
    return 0;
}

sub test_config {
    my ($self, %o) = @_;
    my $dir = $self->{dir};
    my $conf = $o{conf} // $self->{conf};
    my $out = "$dir/nginx-t.out";
    unlink $out;
    my $pid = _spawn($out, $NGINX, '-t', '-p', "$dir/", '-c', "$dir/$conf",
        '-e', "$dir/nginx-t.log");
    _wait_exit($pid, 20) or do { kill 'KILL', $pid; _wait_exit($pid, 5) };
    my $st = $?;
    my $rc = WIFEXITED($st) ? WEXITSTATUS($st) : 128 + WTERMSIG($st);
    my $text = $self->read_file($out) // '';
    # make test-asan: a report from nginx -t fails the final check too
    if ($ENV{CIVICGATE_SANITIZER}) {
        push @{ $self->{sanitizer} }, grep { $_ =~ $SANITIZER_RE }
            split /\n/, "$text\n" . ($self->read_file('nginx-t.log') // '');
    }
    return ($rc, $text);
}

###########################################################################
# logs

sub error_log  { $_[0]->read_file('error.log') // '' }
sub access_log { $_[0]->read_file('access.log') // '' }

sub log_mark {
    my ($self) = @_;
    return -s $self->_path('error.log') // 0;
}

sub log_since {
    my ($self, $mark, $file) = @_;
    my $t = $self->read_file($file // 'error.log') // '';
    return length($t) > ($mark // 0) ? substr($t, $mark // 0) : '';
}

sub wait_for_log {
    my ($self, $re, %o) = @_;
    my $end = time + ($o{timeout} // 3);
    while (1) {
        my $t = $self->log_since($o{since} // 0, $o{file});
        return $1 // $& if $t =~ $re;
        return undef if time >= $end;
        sleep 0.05;
    }
}

sub allow_log {
    my ($self, $re) = @_;
    push @{ $self->{allow} }, $re;
}

sub check_logs {
    my ($self) = @_;
    my $ctx = $self->{ctx};
    return if $ctx->{checked}++;
    for my $name (@{ $ctx->{order} }) {
        my $i = $ctx->{instances}{$name};
        next unless $i->{was_run} || $i->{sanitizer};
        my $log = $i->log_since($i->{log_start} // 0);
        my @bad = grep {
            my $l = $_;
            ($l =~ /\[(?:alert|emerg|crit)\]/ || $l =~ /exited on signal/)
                && !grep { $l =~ $_ } @{ $i->{allow} };
        } split /\n/, $log;
        # make test-asan: sanitizer reports go to stderr, which nginx
        # points at error.log once the configuration is read
        if ($ENV{CIVICGATE_SANITIZER}) {
            # first: the 20 lines shown should not be all "exited on signal"
            unshift @bad, @{ $i->{sanitizer} // [] }, grep { $_ =~ $SANITIZER_RE }
                split /\n/, "$log\n" . ($i->read_file('stderr.log') // '');
        }
        Test::More::ok(!@bad,
            "nginx ($name) error.log has no alert/emerg/crit/crash line")
            or Test::More::diag(join "\n", @bad[0 .. ($#bad > 19 ? 19 : $#bad)]);
    }
}

sub done_testing {
    my ($self, @args) = @_;
    _cleanup_ctx($self->{ctx});
    $self->check_logs;
    Test::More::done_testing(@args);
}

###########################################################################
# redis

sub run_redis {
    my ($self, %o) = @_;
    my $ctx = $self->{ctx};
    croak 'redis-server not found' unless $REDIS_SERVER;
    my $r = $ctx->{redis} //= {};
    croak 'redis already running' if $r->{pid};
    for my $k (qw(args cli_args port no_port auth)) {
        $r->{$k} = $o{$k} if exists $o{$k};
    }
    $r->{args}     //= [];
    $r->{cli_args} //= [];
    $r->{port}     //= 'redis';
    my $port = $self->port($r->{port});
    my $top = $ctx->{topdir};

    my @cmd = ($REDIS_SERVER,
        ($r->{no_port} ? () : ('--port', $port)),
        '--bind', '127.0.0.1',
        '--save', '', '--appendonly', 'no',
        '--dir', $top, '--protected-mode', 'no', '--daemonize', 'no',
        '--pidfile', "$top/redis.pid", '--logfile', "$top/redis.log",
        @{ $r->{args} });
    $r->{pid} = _spawn("$top/redis.out", @cmd);

    my $end = time + ($o{timeout} // 10);
    while (time < $end) {
        if (waitpid($r->{pid}, WNOHANG) == $r->{pid}) {
            $r->{pid} = undef;
            croak "redis-server exited during startup:\n"
                . ($self->read_file("$top/redis.out") // '')
                . ($self->read_file("$top/redis.log") // '');
        }
        my $pong = eval { scalar $self->redis_cmd('PING') } // '';
        return $self if $pong =~ /PONG/;
        sleep 0.05;
    }
    croak "redis-server not ready:\n"
        . ($self->read_file("$top/redis.log") // '');
}

sub stop_redis {
    my ($self) = @_;
    my $r = $self->{ctx}{redis} or return;
    my $pid = $r->{pid} or return;
    kill 'CONT', $pid;
    _terminate($pid, 'TERM', 5);
    $r->{pid} = undef;
}

sub redis_pid  { my $r = $_[0]{ctx}{redis}; $r ? $r->{pid} : undef }
sub redis_port { $_[0]->port($_[0]{ctx}{redis} ? $_[0]{ctx}{redis}{port} : 'redis') }

sub redis_cmd {
    my ($self, @args) = @_;
    croak 'redis-cli not found' unless $REDIS_CLI;
    my $r = $self->{ctx}{redis} // {};
    my @cmd = ($REDIS_CLI, '-h', '127.0.0.1', '-p', $self->redis_port,
        '--raw', @{ $r->{cli_args} // [] }, @args);
    my $pid = open(my $fh, '-|');
    croak "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        open STDERR, '>&', \*STDOUT;
        { exec { $cmd[0] } @cmd; }
        POSIX::_exit(127);
    }
    my $out = do { local $/; <$fh> } // '';
    close $fh;
    $out =~ s/\n\z//;
    return split /\n/, $out, -1 if wantarray;
    return $out;
}

###########################################################################
# a minimal RESP client (no redis-cli round trip, exact replies)

sub _redis_opts {
    my ($self, $args) = @_;
    my %o = (@$args && ref $args->[0] eq 'HASH') ? %{ shift @$args } : ();
    my $r = $self->{ctx}{redis} // {};
    $o{auth} = $r->{auth} if !exists $o{auth} && $r->{auth};
    $o{port} //= $self->redis_port unless defined $o{unix};
    return \%o;
}

sub _resp_encode {
    my (@args) = @_;
    my $out = '*' . scalar(@args) . "\r\n";
    for my $a (@args) {
        $a = '' unless defined $a;
        $out .= '$' . length($a) . "\r\n$a\r\n";
    }
    return $out;
}

sub _resp_read {
    my ($sock, $bufref) = @_;
    my $line = _resp_line($sock, $bufref);
    my $t = substr($line, 0, 1, '');
    if ($t eq '+') { return $line }
    if ($t eq '-') {
        return bless { message => $line }, 'Civicgate::Test::RedisError';
    }
    if ($t eq ':') { return $line + 0 }
    if ($t eq '$') {
        return undef if $line < 0;
        my $need = $line + 2;
        while (length $$bufref < $need) {
            my $n = sysread($sock, $$bufref, 65536, length $$bufref);
            die "redis: connection closed\n" unless $n;
        }
        my $v = substr($$bufref, 0, $line);
        substr($$bufref, 0, $need, '');
        return $v;
    }
    if ($t eq '*') {
        return undef if $line < 0;
        return [ map { _resp_read($sock, $bufref) } 1 .. $line ];
    }
    die "redis: bad reply type '$t'\n";
}

sub _resp_line {
    my ($sock, $bufref) = @_;
    while (1) {
        my $i = index($$bufref, "\r\n");
        if ($i >= 0) {
            my $l = substr($$bufref, 0, $i);
            substr($$bufref, 0, $i + 2, '');
            return $l;
        }
        my $n = sysread($sock, $$bufref, 65536, length $$bufref);
        die "redis: connection closed\n" unless $n;
    }
}

sub redis_pipeline {
    my ($self, @cmds) = @_;
    my $o = $self->_redis_opts(\@cmds);
    my @pre;
    push @pre, [ 'AUTH', @{ $o->{auth} } ] if $o->{auth};
    push @pre, [ 'SELECT', $o->{db} ] if $o->{db};
    my @replies;
    my $ok = eval {
        local $SIG{ALRM} = sub { die "redis: timeout\n" };
        local $SIG{PIPE} = 'IGNORE';
        alarm($o->{timeout} // 10);
        my $s;
        if (defined $o->{unix}) {
            require IO::Socket::UNIX;
            $s = IO::Socket::UNIX->new(Peer => $o->{unix})
                or die "redis: connect $o->{unix}: $!\n";
        } else {
            $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
                PeerPort => $o->{port}, Proto => 'tcp')
                or die "redis: connect 127.0.0.1:$o->{port}: $!\n";
        }
        my $data = join '', map { _resp_encode(@$_) } @pre, @cmds;
        while (length $data) {
            my $n = syswrite($s, $data);
            die "redis: write: $!\n" unless defined $n;
            substr($data, 0, $n, '');
        }
        my $buf = '';
        for my $p (@pre) {
            my $r = _resp_read($s, \$buf);
            die "redis: $p->[0]: $r->{message}\n"
                if ref $r eq 'Civicgate::Test::RedisError';
        }
        push @replies, _resp_read($s, \$buf) for @cmds;
        alarm 0;
        close $s;
        1;
    };
    alarm 0;
    croak $@ unless $ok;
    return @replies;
}

sub redis_query {
    my ($self, @args) = @_;
    my $o = (@args && ref $args[0] eq 'HASH') ? shift @args : {};
    my ($r) = $self->redis_pipeline($o, [ @args ]);
    return $r;
}

sub redis_scan_keys {
    my ($self, @a) = @_;
    my $o = (@a && ref $a[0] eq 'HASH') ? shift @a : {};
    my $match = shift @a;
    my ($cursor, %k, $n) = (0);
    do {
        my $r = $self->redis_query($o, 'SCAN', $cursor, 'COUNT', 1000,
            defined $match ? ('MATCH', $match) : ());
        croak "SCAN: $r->{message}" if ref $r eq 'Civicgate::Test::RedisError';
        $cursor = $r->[0];
        $k{$_} = 1 for @{ $r->[1] };
        croak 'SCAN does not end' if ++$n > 100000;
    } while ($cursor ne '0');
    return sort keys %k;
}

sub redis_stream {
    my ($self, @a) = @_;
    my $o = (@a && ref $a[0] eq 'HASH') ? shift @a : {};
    my ($key) = @a;
    my $r = $self->redis_query($o, 'XRANGE', $key, '-', '+');
    croak "XRANGE: $r->{message}" if ref $r eq 'Civicgate::Test::RedisError';
    return [ map {
        my ($id, $fv) = @$_;
        my %f = @$fv;
        { id => $id, fields => [ @$fv ], f => \%f,
          names => [ @{$fv}[ grep { !($_ % 2) } 0 .. $#$fv ] ] }
    } @{ $r // [] } ];
}

# A journey's timeline (docs/redis-keys.md), one entry per event, each as
# { id => SID, f => { field => value }, fields => [ values ], raw => text }
# with the journey in f too, so entries compare with cg:events' fields.
our @TIMELINE_FIELDS =
    qw(sid time channel service status method latency_ms eid citizen);

sub journey_timeline {
    my ($self, @a) = @_;
    my $o = (@a && ref $a[0] eq 'HASH') ? shift @a : {};
    my ($j) = @a;
    my $r = $self->redis_query($o, 'LRANGE', "cg:{j:$j}:timeline", 0, -1);
    croak "LRANGE: $r->{message}" if ref $r eq 'Civicgate::Test::RedisError';
    return [ map {
        my @v = split / /, $_, -1;
        my %f;
        @f{@TIMELINE_FIELDS} = @v;
        $f{journey} = $j;
        { id => $v[0], f => \%f, fields => \@v, raw => $_ }
    } @{ $r // [] } ];
}

sub journey_length {
    my ($self, @a) = @_;
    my $o = (@a && ref $a[0] eq 'HASH') ? shift @a : {};
    my $n = $self->redis_query($o, 'LLEN', "cg:{j:$a[0]}:timeline");
    return (defined $n && !ref $n) ? $n : 0;
}

# what a reader derives from a timeline, as docs/redis-keys.md says
sub journey_summary {
    my ($self, @a) = @_;
    my $tl = $self->journey_timeline(@a);
    return {} unless @$tl;
    my (%s, %seen, @ch, $last);
    for my $e (@$tl) {
        my $f = $e->{f};
        $s{first_seen} = $f->{time}
            if !defined $s{first_seen} || $f->{time} < $s{first_seen};
        $last = $f if !defined $last || $f->{time} >= $last->{time};
        push @ch, $f->{channel} if length $f->{channel} && !$seen{ $f->{channel} }++;
        $s{citizen} = $f->{citizen} if length $f->{citizen};
    }
    $s{last_seen} = $last->{time};
    $s{last_status} = $last->{status};
    $s{last_service} = $last->{service};
    $s{last_channel} = $last->{channel};
    $s{channels} = join ',', @ch;
    $s{events} = scalar @$tl;
    return \%s;
}

sub redis_hash {
    my ($self, @a) = @_;
    my $o = (@a && ref $a[0] eq 'HASH') ? shift @a : {};
    my $r = $self->redis_query($o, 'HGETALL', $a[0]);
    croak "HGETALL: $r->{message}" if ref $r eq 'Civicgate::Test::RedisError';
    return { @{ $r // [] } };
}

sub redis_clients {
    my ($self, @a) = @_;
    my $o = (@a && ref $a[0] eq 'HASH') ? shift @a : {};
    my $r = $self->redis_query($o, 'CLIENT', 'LIST');
    croak "CLIENT LIST: $r->{message}"
        if ref $r eq 'Civicgate::Test::RedisError';
    my @c;
    for my $l (split /\r?\n/, $r // '') {
        my %f;
        for my $kv (split / /, $l) {
            my ($k, $v) = split /=/, $kv, 2;
            $f{$k} = $v // '';
        }
        push @c, \%f if %f;
    }
    return @c;
}

sub wait_until {
    my ($self, $code, %o) = @_;
    my $end = time + ($o{timeout} // 5);
    while (1) {
        my $v = $code->();
        return $v if $v;
        return undef if time >= $end;
        sleep($o{interval} // 0.05);
    }
}

###########################################################################
# load generators

sub start_load {
    my ($self, %o) = @_;
    my $ctx = $self->{ctx};
    my $clients = $o{clients} // 1;
    my $requests = $o{requests} // 10;
    my $port = $o{port} // $self->port(0);
    my $n = ++$ctx->{nloads};
    my $job = { files => [], pids => [], started => time };
    for my $c (1 .. $clients) {
        my $file = "$ctx->{topdir}/load-$n-$c.txt";
        unlink $file;
        my $pid = fork;
        croak "fork: $!" unless defined $pid;
        if ($pid == 0) {
            $SIG{INT} = $SIG{TERM} = 'DEFAULT';
            open my $fh, '>', $file or POSIX::_exit(1);
            my $old = select $fh; $| = 1; select $old;
            for my $i (1 .. $requests) {
                my $path = ref $o{path} eq 'CODE' ? $o{path}->($c, $i)
                    : ($o{path} // '/');
                my $h = ref $o{headers} eq 'CODE' ? $o{headers}->($c, $i)
                    : ($o{headers} // []);
                my $t0 = time;
                my $raw = http_get($path, port => $port, headers => $h,
                    timeout => $o{timeout} // 5, quiet => 1,
                    ($o{method} ? (method => $o{method}) : ()));
                my $el = time - $t0;
                my $r = parse_response($raw);
                my $j = $r->header('X-Journey-ID') // '';
                my $b = $r->body // '';
                $b =~ s/\n.*//s;
                $b =~ tr/\t\r/  /;
                printf $fh "%d\t%d\t%d\t%.6f\t%.6f\t%s\t%s\n",
                    $c, $i, $r->status, $t0, $el, $j, $b;
                sleep $o{interval} if $o{interval};
            }
            close $fh;
            POSIX::_exit(0);
        }
        $ctx->{daemons}{$pid} = [ 'load client' ];
        push @{ $job->{pids} }, $pid;
        push @{ $job->{files} }, $file;
    }
    return $job;
}

sub wait_load {
    my ($self, $job, %o) = @_;
    my $end = time + ($o{timeout} // 60);
    for my $pid (@{ $job->{pids} }) {
        my $left = $end - time;
        unless (_wait_exit($pid, $left > 0 ? $left : 0)) {
            Test::More::diag("load client $pid did not finish in time");
            kill 'KILL', $pid;
            _wait_exit($pid, 5);
        }
        delete $self->{ctx}{daemons}{$pid};
    }
    my $res = { results => [], answered => 0, statuses => {},
        max_elapsed => 0, elapsed => time - $job->{started} };
    for my $file (@{ $job->{files} }) {
        open my $fh, '<', $file or next;
        while (my $l = <$fh>) {
            chomp $l;
            my ($c, $i, $st, $t0, $el, $j, $b) = split /\t/, $l, 7;
            push @{ $res->{results} }, { client => $c, i => $i,
                status => $st, start => $t0, elapsed => $el,
                journey => $j, body => $b // '' };
            $res->{statuses}{$st}++;
            $res->{answered}++ if $st == 200;
            $res->{max_elapsed} = $el if $el > $res->{max_elapsed};
        }
    }
    return $res;
}

# the same load on several gateways at once; what they admitted together
sub load_gateways {
    my ($self, $ports, %o) = @_;
    my %job = map { $_ => $self->start_load(clients => 2, interval => 0.01,
        %o, port => $ports->{$_}) } sort keys %$ports;
    my $sum = { total => 0, admitted => {}, statuses => {} };
    my ($first, $last);
    for my $g (sort keys %job) {
        my $res = $self->wait_load($job{$g}, timeout => 60);
        for my $r (@{ $res->{results} }) {
            $sum->{statuses}{ $r->{status} }++;
            if ($r->{status} == 200) {
                $sum->{admitted}{$g}++;
                $sum->{total}++;
            }
            $first = $r->{start} if !defined $first || $r->{start} < $first;
            my $end = $r->{start} + $r->{elapsed};
            $last = $end if !defined $last || $end > $last;
        }
    }
    $sum->{span} = ($last // 0) - ($first // 0);
    return $sum;
}

sub http_burst {
    # function: http_burst(\@raw_requests, port => $p, timeout => 10)
    my ($reqs, %o) = @_;
    my $port = $o{port} // croak 'http_burst: port => needed';
    require IO::Select;
    local $SIG{PIPE} = 'IGNORE';
    my (@socks, @out, @in);
    for my $i (0 .. $#$reqs) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $port, Proto => 'tcp', Blocking => 1);
        unless ($s) {
            Test::More::diag("http_burst: connect: $!");
            next;
        }
        $s->blocking(0);
        $socks[$i] = $s;
        $out[$i] = $reqs->[$i];
        $in[$i] = '';
    }
    my $end = time + ($o{timeout} // 10);
    my %open = map { $_ => 1 } grep { $socks[$_] } 0 .. $#$reqs;
    while (%open && time < $end) {
        my $rs = IO::Select->new;
        my $ws = IO::Select->new;
        my %byfd;
        for my $i (keys %open) {
            my $s = $socks[$i];
            $byfd{ fileno $s } = $i;
            $rs->add($s);
            $ws->add($s) if length $out[$i];
        }
        my ($r, $w) = IO::Select->select($rs, $ws, undef, 0.2);
        for my $s (@{ $w || [] }) {
            my $i = $byfd{ fileno $s };
            my $n = syswrite($s, $out[$i]);
            substr($out[$i], 0, $n, '') if $n;
        }
        for my $s (@{ $r || [] }) {
            my $i = $byfd{ fileno $s };
            my $n = sysread($s, $in[$i], 65536, length $in[$i]);
            next if !defined $n && $!{EAGAIN};
            if (!$n) {
                close $s;
                delete $open{$i};
            }
        }
    }
    close $socks[$_] for keys %open;
    return map { length($in[$_] // '') ? $in[$_] : undef } 0 .. $#$reqs;
}

###########################################################################
# daemons

sub run_daemon {
    my ($self, @cmd) = @_;
    my $ctx = $self->{ctx};
    my $n = ++$ctx->{ndaemons};
    my $pid = _spawn("$ctx->{topdir}/daemon-$n.log", @cmd);
    $ctx->{daemons}{$pid} = \@cmd;
    return $pid;
}

sub run_stalled_peer {
    my ($self, $port, $accepts) = @_;
    require IO::Select;
    my $pid = $self->run_daemon(sub {
        my $l = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
            LocalPort => $port, Listen => 128, ReuseAddr => 1)
            or die "listen $port: $!";
        my $sel = IO::Select->new($l);
        my $log;
        if (defined $accepts) {
            open $log, '>>', $accepts or die "$accepts: $!";
            my $old = select $log; $| = 1; select $old;
        }
        my $end = time + 180;
        while (time < $end) {
            for my $s ($sel->can_read(0.5)) {
                if ($s == $l) {
                    my $c = $l->accept or next;
                    $sel->add($c);
                    printf $log "%.3f\n", time if $log;
                } elsif (!sysread($s, my $buf, 65536)) {
                    $sel->remove($s);
                    close $s;
                }
            }
        }
    });
    $self->wait_port($port) or croak "stalled peer on $port not listening";
    return $pid;
}

sub run_daemon_logged {
    my ($self, $log, @cmd) = @_;
    my $pid = _spawn($self->_path($log), @cmd);
    $self->{ctx}{daemons}{$pid} = \@cmd;
    return $pid;
}

sub stop_daemon {
    my ($self, $pid) = @_;
    return unless delete $self->{ctx}{daemons}{$pid};
    kill 'CONT', $pid;
    _terminate($pid, 'TERM', 3);
}

sub forget_daemon {
    my ($self, $pid) = @_;
    delete $self->{ctx}{daemons}{$pid};
}

###########################################################################
# cleanup

sub _cleanup_ctx {
    my ($ctx) = @_;
    return if $ctx->{owner} != $$;
    for my $name (reverse @{ $ctx->{order} }) {
        my $i = $ctx->{instances}{$name};
        $i->stop if $i && $i->{pid};
    }
    if ($ctx->{redis} && $ctx->{redis}{pid}) {
        kill 'CONT', $ctx->{redis}{pid};
        _terminate($ctx->{redis}{pid}, 'TERM', 5);
        $ctx->{redis}{pid} = undef;
    }
    for my $pid (keys %{ $ctx->{daemons} }) {
        kill 'CONT', $pid;
        _terminate($pid, 'TERM', 3);
        delete $ctx->{daemons}{$pid};
    }
}

sub DESTROY {
    my ($self) = @_;
    return if ${^GLOBAL_PHASE} eq 'DESTRUCT';
    return unless $self->{ctx} && $self->{ctx}{owner} == $$;
    $self->stop if $self->{pid} && $self->{name} ne 'main';
}

$SIG{INT}  = sub { die "interrupted (SIGINT)\n" };
$SIG{TERM} = sub { die "terminated (SIGTERM)\n" };

END {
    if ($$ == $CREATOR) {
        my $rc = $?;
        for my $ctx (@CONTEXTS) {
            _cleanup_ctx($ctx);
            unless ($ctx->{checked}) {
                my ($main) = $ctx->{instances}{main};
                $main->check_logs if $main;
            }
        }
        $? = $rc;
    }
}

###########################################################################
# HTTP

sub http {
    # function: http($raw, port => ...); method: $t->http($raw, %o)
    if (ref $_[0] && eval { $_[0]->isa(__PACKAGE__) }) {
        my ($self, $req, %o) = @_;
        $o{port} //= $self->port(0);
        return http($req, %o);
    }
    my ($request, %o) = @_;
    my $port = $o{port} // croak 'http: port => needed';
    my $reply = '';
    my $ok = eval {
        local $SIG{ALRM} = sub { die "timeout\n" };
        local $SIG{PIPE} = 'IGNORE';
        alarm($o{timeout} // 8);
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $port, Proto => 'tcp')
            or die "connect to 127.0.0.1:$port: $!\n";
        $s->autoflush(1);
        my @parts = $o{parts} ? @{ $o{parts} } : ($request);
        for my $i (0 .. $#parts) {
            sleep($o{delay} // 0.1) if $i;
            my $data = $parts[$i];
            while (length $data) {
                my $n = syswrite($s, $data);
                die "write: $!\n" unless defined $n;
                substr($data, 0, $n, '');
            }
        }
        while (1) {
            my $n = sysread($s, my $buf, 65536);
            die "read: $!\n" unless defined $n;
            last if $n == 0;
            $reply .= $buf;
        }
        alarm 0;
        close $s;
        1;
    };
    alarm 0;
    if (!$ok && !length $reply) {
        Test::More::diag("http: $@") unless $o{quiet};
        return undef;
    }
    return $reply;
}

sub _header_pairs {
    my ($h) = @_;
    return () unless $h;
    return map { [ $_, $h->{$_} ] } sort keys %$h if ref $h eq 'HASH';
    my @p;
    for (my $i = 0; $i < @$h; $i += 2) {
        push @p, [ $h->[$i], $h->[$i + 1] ];
    }
    return @p;
}

sub build_request {
    my ($path, %o) = @_;
    my $v = $o{version} // '1.1';
    my $m = $o{method} // 'GET';
    my $req = "$m $path HTTP/$v\r\n";
    $req .= 'Host: ' . ($o{host} // 'localhost') . "\r\n"
        unless exists $o{host} && !defined $o{host};
    $req .= "Connection: close\r\n" if $v eq '1.1';
    for my $p (_header_pairs($o{headers})) {
        $req .= "$p->[0]: $p->[1]\r\n";
    }
    if (defined $o{body}) {
        $req .= 'Content-Length: ' . length($o{body}) . "\r\n";
    }
    $req .= "\r\n";
    $req .= $o{body} if defined $o{body};
    return $req;
}

sub is_redis_error {
    return ref $_[0] eq 'Civicgate::Test::RedisError';
}

sub http_get {
    # function: http_get($path, %o); method: $t->http_get($path, %o)
    if (ref $_[0] && eval { $_[0]->isa(__PACKAGE__) }) {
        my ($self, $path, %o) = @_;
        $o{port} //= $self->port(0);
        return http(build_request($path, %o), %o);
    }
    my ($path, %o) = @_;
    return http(build_request($path, %o), %o);
}

sub request {
    my ($self, $path, %o) = @_;
    return parse_response($self->http_get($path, %o));
}

# a request of a citizen, through a channel (default web), of a journey
sub citizen_request {
    my ($self, $path, $citizen, %o) = @_;
    return $self->request($path, %o, method => $o{method} // 'GET',
        headers => [ 'X-Citizen-Id' => $citizen,
                     'X-Channel' => $o{channel} // 'web',
                     ($o{journey} ? ('X-Journey-ID' => $o{journey}) : ()) ],
        body => $o{body});
}

sub metrics {
    my ($self, %o) = @_;
    my $r = $self->request($o{path} // '/metrics', %o);
    return undef unless $r->status == 200;
    return parse_metrics($r->body);
}

# method form of http(), an alias of $t->http
sub raw_http {
    my ($self, $req, %o) = @_;
    $o{port} //= $self->port(0);
    return http($req, %o);
}

sub parse_response {
    my ($raw) = @_;
    my $r = bless { raw => $raw, status => 0, headers => {}, body => undef,
        version => undef, reason => undef }, 'Civicgate::Test::Response';
    return $r unless defined $raw && length $raw;
    my ($head, $body) = split /\r?\n\r?\n/, $raw, 2;
    my @lines = split /\r?\n/, $head;
    my $sl = shift @lines // '';
    if ($sl =~ m{^HTTP/(\d\.\d)\s+(\d{3})\s*(.*)$}) {
        @$r{qw(version status reason)} = ($1, $2 + 0, $3);
    }
    for my $l (@lines) {
        next unless $l =~ /^([^:\s]+)\s*:\s*(.*?)\s*$/;
        push @{ $r->{headers}{ lc $1 } }, $2;
    }
    $body //= '';
    my $te = $r->{headers}{'transfer-encoding'};
    if ($te && grep { /chunked/i } @$te) {
        my $out = '';
        while ($body =~ s/^([0-9a-fA-F]+)[^\r\n]*\r?\n//) {
            my $n = hex $1;
            last if $n == 0;
            $out .= substr($body, 0, $n, '');
            $body =~ s/^\r?\n//;
        }
        $body = $out;
    }
    $r->{body} = $body;
    return $r;
}

sub parse_metrics {
    my ($text) = @_;
    my %m;
    for my $l (split /\n/, $text // '') {
        next if $l =~ /^\s*(#|$)/;
        if ($l =~ /^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/) {
            $m{ $1 . ($2 // '') } = $3 + 0;
        }
    }
    return \%m;
}

sub metric {
    my ($m, $name, %labels) = @_;
    my ($sum, $found) = (0, 0);
    for my $k (keys %$m) {
        next unless $k =~ /^\Q$name\E(?:\{(.*)\})?$/;
        my $ls = $1 // '';
        my %l;
        while ($ls =~ /(\w+)="((?:[^"\\]|\\.)*)"/g) {
            $l{$1} = $2;
        }
        next if grep { !defined $l{$_} || $l{$_} ne $labels{$_} } keys %labels;
        $sum += $m->{$k};
        $found++;
    }
    return $found ? $sum : undef;
}

###########################################################################
# independent computations

my $ALPHABET = '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
my %SYMBOL;
@SYMBOL{ split //, $ALPHABET } = (0 .. 31);

sub random_bytes {
    my ($n) = @_;
    my $b = '';
    if (open my $fh, '<:raw', '/dev/urandom') {
        read($fh, $b, $n);
    }
    $b .= chr(int rand 256) while length $b < $n;
    return $b;
}

sub random_key_hex {
    my ($n) = @_;
    return unpack 'H*', random_bytes($n // 32);
}

sub hkdf_sha256 {
    my ($ikm, $info, $len, $salt) = @_;
    $salt = "\0" x 32 if !defined $salt || $salt eq '';
    my $prk = hmac_sha256($ikm, $salt);
    my ($okm, $t) = ('', '');
    for (my $i = 1; length $okm < $len; $i++) {
        $t = hmac_sha256($t . $info . chr($i), $prk);
        $okm .= $t;
    }
    return substr($okm, 0, $len);
}

sub journey_subkey {
    return hkdf_sha256($_[0], 'civicgate journey id v1', 32);
}

sub citizen_subkey {
    return hkdf_sha256($_[0], 'civicgate citizen pseudonym v1', 32);
}

sub pseudonym {
    my ($hexkey, $raw) = @_;
    my $sub = citizen_subkey(pack 'H*', $hexkey);
    return unpack 'H*', substr(hmac_sha256($raw, $sub), 0, 16);
}

sub crockford_encode {
    my ($bytes, $nbits) = @_;
    $nbits //= 8 * length $bytes;
    my $bits = substr(unpack('B*', $bytes), 0, $nbits);
    $bits .= '0' x ((5 - length($bits) % 5) % 5);
    my $out = '';
    for (my $i = 0; $i < length $bits; $i += 5) {
        $out .= substr($ALPHABET, oct('0b' . substr($bits, $i, 5)), 1);
    }
    return $out;
}

sub crockford_decode {
    my ($sym) = @_;
    my $bits = '';
    for my $c (split //, $sym) {
        return undef unless exists $SYMBOL{$c};
        $bits .= sprintf '%05b', $SYMBOL{$c};
    }
    $bits .= '0' x ((8 - length($bits) % 8) % 8);
    return pack 'B*', $bits;
}

sub canonical_journey_id {
    my ($in) = @_;
    return undef unless defined $in;
    my $s = uc $in;
    $s =~ s/-//g;
    $s =~ tr/IL/11/;
    $s =~ tr/O/0/;
    return undef unless $s =~ /^[0-9A-HJKMNP-TV-Z]{20}$/;
    return join '-', unpack '(A5)4', $s;
}

sub journey_id_re {
    return qr/^[0-9A-HJKMNP-TV-Z]{5}(?:-[0-9A-HJKMNP-TV-Z]{5}){3}$/;
}

sub _jid_tag {
    my ($keybytes, $unique) = @_;
    my $tag = substr(hmac_sha256('civicgate-journey' . $unique,
        journey_subkey($keybytes)), 0, 5);
    substr($tag, 4, 1) = chr(ord(substr($tag, 4, 1)) & 0xF0);
    return $tag;
}

sub mint_journey_id {
    my ($hexkey, $unique) = @_;
    $unique //= random_bytes(8);
    croak 'unique part must be 8 bytes' unless length $unique == 8;
    my $raw = $unique . _jid_tag(pack('H*', $hexkey), $unique);
    return canonical_journey_id(crockford_encode($raw, 100));
}

sub verify_journey_id {
    my ($id, @hexkeys) = @_;
    my $c = canonical_journey_id($id) // return undef;
    (my $sym = $c) =~ s/-//g;
    my $raw = crockford_decode($sym);    # 13 bytes, last 4 bits zero
    my $unique = substr($raw, 0, 8);
    my $tag = substr($raw, 8, 5);
    for my $i (0 .. $#hexkeys) {
        return $i if _jid_tag(pack('H*', $hexkeys[$i]), $unique) eq $tag;
    }
    return undef;
}

###########################################################################

package Civicgate::Test::Response;

sub status  { $_[0]{status} }
sub version { $_[0]{version} }
sub reason  { $_[0]{reason} }
sub body    { $_[0]{body} }
sub raw     { $_[0]{raw} }
sub headers { $_[0]{headers} }

sub header {
    my ($self, $name) = @_;
    my $v = $self->{headers}{ lc $name } or return undef;
    return join ', ', @$v;
}

sub header_list {
    my ($self, $name) = @_;
    return @{ $self->{headers}{ lc $name } || [] };
}

package Civicgate::Test::RedisError;

use overload '""' => sub { $_[0]{message} }, fallback => 1;

sub message { $_[0]{message} }

1;

###########################################################################
# consent: receipts and a whole-keyspace search (appended for t/consent_*.t)

package Civicgate::Test;

=head2 Consent helpers (exported)

    canonical_json($data)              compact JSON, keys sorted, UTF-8 bytes
                                       (as jansson JSON_COMPACT|JSON_SORT_KEYS)
    receipt_subkey($key_bytes)         HKDF-SHA256(key, "civicgate consent receipt v1", 32)
    receipt_signature($hexkey, \%r)    base64url (no padding) HMAC-SHA256 under the
                                       receipt subkey over canonical_json of %r
                                       without "signature"

    $t->redis_find_strings([\%o,] @needles)
                 SCANs every key; looks at the key name, DUMP, and the typed
                 contents (GET, HGETALL, XRANGE, ZRANGE WITHSCORES, LRANGE,
                 SMEMBERS); returns a hash ref { needle => [ "where", ... ] }
                 (an empty list where a needle was not found), plus
                 '_keys' => [ every key ]

=cut

push @Civicgate::Test::EXPORT_OK,
    qw(canonical_json receipt_subkey receipt_signature);

sub canonical_json {
    require JSON::PP;
    return JSON::PP->new->utf8->canonical->encode($_[0]);
}

sub receipt_subkey {
    return hkdf_sha256($_[0], 'civicgate consent receipt v1', 32);
}

sub receipt_signature {
    my ($hexkey, $receipt) = @_;
    require MIME::Base64;
    my %r = %$receipt;
    delete $r{signature};
    my $mac = hmac_sha256(canonical_json(\%r),
        receipt_subkey(pack 'H*', $hexkey));
    my $b = MIME::Base64::encode_base64($mac, '');
    $b =~ tr{+/}{-_};
    $b =~ s/=+\z//;
    return $b;
}

sub redis_find_strings {
    my ($self, @a) = @_;
    my $o = (@a && ref $a[0] eq 'HASH') ? shift @a : {};
    my @needles = @a;
    my %found = map { $_ => [] } @needles;
    my @keys = $self->redis_scan_keys($o);
    my $flat;
    $flat = sub { map { ref $_ eq 'ARRAY' ? $flat->(@$_) : ($_) } @_ };
    for my $k (@keys) {
        my $type = $self->redis_query($o, 'TYPE', $k);
        my @cmds = ([ 'DUMP', $k ]);
        push @cmds, [ 'GET', $k ] if $type eq 'string';
        push @cmds, [ 'HGETALL', $k ] if $type eq 'hash';
        push @cmds, [ 'XRANGE', $k, '-', '+' ] if $type eq 'stream';
        push @cmds, [ 'ZRANGE', $k, 0, -1, 'WITHSCORES' ] if $type eq 'zset';
        push @cmds, [ 'LRANGE', $k, 0, -1 ] if $type eq 'list';
        push @cmds, [ 'SMEMBERS', $k ] if $type eq 'set';
        my @rep = $self->redis_pipeline($o, @cmds);
        for my $n (@needles) {
            push @{ $found{$n} }, "key name $k" if index($k, $n) >= 0;
            for my $i (0 .. $#cmds) {
                push @{ $found{$n} }, "$cmds[$i][0] $k"
                    if grep { defined && !ref && index($_, $n) >= 0 }
                        $flat->($rep[$i]);
            }
        }
    }
    $found{_keys} = \@keys;
    return \%found;
}

1;

###########################################################################
# streams: Server-Sent Events and long-polls, many at once (t/status_*.t)

package Civicgate::Test;

=head2 Streams (sse_pump exported)

    my $s = $t->sse_open($path, port => ..., headers => [ Name => value ],
                         accept => 'text/event-stream', close => 0)
                 connects (blocking, 5 s), sends a GET (HTTP/1.1, keep-alive
                 unless close => 1; accept => undef sends no Accept) and
                 returns a Civicgate::Test::Stream on a non-blocking socket.
                 Croaks when it cannot connect.
    $s->pump($timeout)      reads what arrives within $timeout s
    $s->wait_for($code [, $timeout = 5])
                 pumps until $code->($s) is true: returns that, or undef
    $s->status, $s->header($name), $s->head_done, $s->head (raw header text)
    $s->body                de-chunked body so far
    $s->blocks              every complete SSE block (up to a blank line):
                            array ref of { event, id, data, retry,
                            comments => [...], fields => [names], time }
                            (time: when it was read)
    $s->events              the blocks with an event or data line
    $s->new_events          the events not yet returned by new_events
    $s->forget              drops the parsed body and the blocks already
                            returned by new_events (long streams)
    $s->comments            every comment line's text, in order
    $s->first_line          the body's first line
    $s->last_chunk          the terminating chunk "0\r\n\r\n" was read
    $s->closed              the peer closed the connection (time: closed_at)
    $s->first_at            when the first byte of the answer was read
    $s->close
    sse_pump(\@streams, $timeout [, $until])
                 select over the streams until $until->() is true (checked
                 after every read) or the timeout; returns the last value
                 of $until (1 without one)

    my $sub = $t->redis_subscribe([\%o,] @channels)
                 a connection SUBSCRIBEd to the channels (confirmed)
    $sub->next($timeout = 3)    the next message as [channel, payload],
                                undef at the timeout
    $sub->close

=cut

push @Civicgate::Test::EXPORT_OK, qw(sse_pump);

sub sse_open {
    my ($self, $path, %o) = @_;
    my $port = $o{port} // $self->port(0);
    my $accept = exists $o{accept} ? $o{accept} : 'text/event-stream';
    my $req = "GET $path HTTP/1.1\r\nHost: localhost\r\n";
    $req .= "Accept: $accept\r\n" if defined $accept;
    $req .= "Connection: close\r\n" if $o{close};
    for my $p (_header_pairs($o{headers})) {
        $req .= "$p->[0]: $p->[1]\r\n";
    }
    $req .= "\r\n";
    my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $port, Proto => 'tcp', Timeout => 5)
        or croak "connect to 127.0.0.1:$port: $!";
    local $SIG{PIPE} = 'IGNORE';
    my $off = 0;
    while ($off < length $req) {
        my $n = syswrite($sock, $req, length($req) - $off, $off);
        croak "write: $!" unless defined $n;
        $off += $n;
    }
    $sock->blocking(0);
    return Civicgate::Test::Stream->_new($sock, time);
}

sub sse_pump {
    my ($streams, $timeout, $until) = @_;
    require IO::Select;
    my $end = time + ($timeout // 0);
    my %by = map { fileno($_->{sock}) => $_ }
        grep { !$_->{closed} && $_->{sock} } @$streams;
    my $sel = IO::Select->new(map { $_->{sock} } values %by);
    my $ok = $until ? $until->() : 1;
    while (!($until && $ok)) {
        my $left = $end - time;
        last if $left <= 0 || !$sel->count;
        for my $sock ($sel->can_read($left > 0.2 ? 0.2 : $left)) {
            my $s = $by{ fileno $sock };
            $s->_read;
            $sel->remove($sock) if $s->{closed};
        }
        $ok = $until->() if $until;
    }
    return $ok;
}

sub redis_subscribe {
    my ($self, @ch) = @_;
    my $o = $self->_redis_opts(\@ch);
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $o->{port}, Proto => 'tcp', Timeout => 3)
        or croak "redis: connect 127.0.0.1:$o->{port}: $!";
    my $sub = bless { sock => $s, buf => '' }, 'Civicgate::Test::Subscriber';
    my @cmds = (($o->{auth} ? ([ 'AUTH', @{ $o->{auth} } ]) : ()),
        [ 'SUBSCRIBE', @ch ]);
    print $s join '', map { _resp_encode(@$_) } @cmds;
    for (1 .. @cmds - 1 + @ch) {
        my $r = $sub->_reply(3);
        croak "redis: SUBSCRIBE: " . ($r // 'timeout')
            if !defined $r || is_redis_error($r);
    }
    return $sub;
}

package Civicgate::Test::Subscriber;

sub _reply {
    my ($self, $timeout) = @_;
    my $r;
    my $ok = eval {
        local $SIG{ALRM} = sub { die "timeout\n" };
        alarm($timeout);
        $r = Civicgate::Test::_resp_read($self->{sock}, \$self->{buf});
        alarm 0;
        1;
    };
    alarm 0;
    return $ok ? $r : undef;
}

sub next {
    my ($self, $timeout) = @_;
    my $r = $self->_reply($timeout // 3);
    return undef unless ref $r eq 'ARRAY' && ($r->[0] // '') eq 'message';
    return [ $r->[1], $r->[2] ];
}

sub close {
    my ($self) = @_;
    CORE::close($self->{sock}) if $self->{sock};
    $self->{sock} = undef;
}

package Civicgate::Test::Stream;

# a response read as it arrives: status, body, header() and headers as a
# Civicgate::Test::Response has them
use parent -norequire, 'Civicgate::Test::Response';
use Time::HiRes qw(time);

sub _new {
    my ($class, $sock, $t0) = @_;
    return bless { sock => $sock, opened => $t0, raw => '', head => undef,
        status => 0, headers => {}, chunked => 0, left => 0, crlf => 0,
        zero => 0, last_chunk => 0, body => '', parsed => 0, line => '',
        cur => undef, blocks => [], seen => 0, closed => 0,
        closed_at => undef }, $class;
}

sub head_done  { defined $_[0]{head} }
sub head       { $_[0]{head} }
sub blocks     { $_[0]{blocks} }
sub last_chunk { $_[0]{last_chunk} }
sub closed     { $_[0]{closed} }
sub closed_at  { $_[0]{closed_at} }
sub opened     { $_[0]{opened} }
sub first_at   { $_[0]{first_at} }

sub events {
    my ($self) = @_;
    return [ grep { defined $_->{event} || defined $_->{data} }
        @{ $self->{blocks} } ];
}

sub new_events {
    my ($self) = @_;
    my $ev = $self->events;
    my @new = @$ev[ $self->{seen} .. $#$ev ];
    $self->{seen} = @$ev;
    return \@new;
}

sub forget {
    my ($self) = @_;
    substr($self->{body}, 0, $self->{parsed}, '');
    $self->{parsed} = 0;
    my $ev = $self->events;
    return unless $self->{seen};
    my $last = $ev->[ $self->{seen} - 1 ];
    while (@{ $self->{blocks} }) {
        my $b = shift @{ $self->{blocks} };
        last if $b == $last;
    }
    $self->{seen} = 0;
}

sub comments {
    my ($self) = @_;
    return [ map { @{ $_->{comments} } } @{ $self->{blocks} } ];
}

sub first_line {
    my ($self) = @_;
    return $self->{body} =~ /^([^\r\n]*)\r?\n/ ? $1 : undef;
}

sub pump {
    my ($self, $timeout) = @_;
    return Civicgate::Test::sse_pump([ $self ], $timeout);
}

sub wait_for {
    my ($self, $code, $timeout) = @_;
    my $v;
    Civicgate::Test::sse_pump([ $self ], $timeout // 5,
        sub { $v = $code->($self) });
    return $v;
}

sub close {
    my ($self) = @_;
    if ($self->{sock}) {
        CORE::close($self->{sock});
        $self->{sock} = undef;
    }
    $self->{closed} ||= 1;
}

sub _read {
    my ($self) = @_;
    my $now = time;
    while (1) {
        my $n = sysread($self->{sock}, my $buf, 65536);
        if (!defined $n) {
            last if $!{EAGAIN} || $!{EWOULDBLOCK};
            $n = 0;
        }
        if ($n == 0) {
            $self->_feed('', $now);
            CORE::close($self->{sock});
            $self->{sock} = undef;
            $self->{closed} = 1;
            $self->{closed_at} = $now;
            last;
        }
        $self->{first_at} //= $now;
        $self->_feed($buf, $now);
    }
}

sub _feed {
    my ($self, $data, $now) = @_;
    $self->{raw} .= $data;
    unless (defined $self->{head}) {
        my $i = index($self->{raw}, "\r\n\r\n");
        return if $i < 0;
        my $head = substr($self->{raw}, 0, $i + 4, '');
        $self->{head} = $head;
        my @lines = split /\r\n/, $head;
        my $sl = shift @lines // '';
        $self->{status} = $1 + 0 if $sl =~ m{^HTTP/\d\.\d\s+(\d{3})};
        for my $l (@lines) {
            push @{ $self->{headers}{ lc $1 } }, $2
                if $l =~ /^([^:\s]+)\s*:\s*(.*?)\s*$/;
        }
        $self->{chunked} = 1
            if grep { /chunked/i } @{ $self->{headers}{'transfer-encoding'}
                || [] };
    }
    if (!$self->{chunked}) {
        $self->{body} .= $self->{raw};
        $self->{raw} = '';
    } else {
        $self->_dechunk;
    }
    $self->_parse($now);
}

sub _dechunk {
    my ($self) = @_;
    my $r = \$self->{raw};
    while (length $$r && !$self->{last_chunk}) {
        if ($self->{left}) {
            my $n = $self->{left} < length $$r ? $self->{left} : length $$r;
            $self->{body} .= substr($$r, 0, $n, '');
            $self->{left} -= $n;
            $self->{crlf} = 1 unless $self->{left};
            next;
        }
        if ($self->{crlf} || $self->{zero}) {
            last if length $$r < 2;
            substr($$r, 0, 2, '');
            $self->{crlf} = 0;
            $self->{last_chunk} = 1 if $self->{zero};
            next;
        }
        my $i = index($$r, "\r\n");
        last if $i < 0;
        my $line = substr($$r, 0, $i + 2, '');
        my $size = $line =~ /^([0-9a-fA-F]+)/ ? hex $1 : 0;
        if ($size) {
            $self->{left} = $size;
        } else {
            $self->{zero} = 1;
        }
    }
}

sub _parse {
    my ($self, $now) = @_;
    my $b = \$self->{body};
    while (1) {
        my $rest = length($$b) - $self->{parsed};
        last if $rest <= 0;
        my $chunk = substr($$b, $self->{parsed});
        last unless $chunk =~ /^([^\r\n]*)(\r\n|\n|\r(?!\z))/;
        my ($line, $eol) = ($1, $2);
        $self->{parsed} += length($line) + length($eol);
        my $cur = $self->{cur} //= { comments => [], fields => [] };
        if ($line eq '') {
            $cur->{time} = $now;
            push @{ $self->{blocks} }, $cur;
            $self->{cur} = undef;
            next;
        }
        if ($line =~ /^:\s?(.*)$/) {
            push @{ $cur->{comments} }, $1;
            next;
        }
        my ($f, $v) = $line =~ /^([^:]*)(?::\s?(.*))?$/;
        $v //= '';
        push @{ $cur->{fields} }, $f;
        if ($f eq 'data') {
            $cur->{data} = defined $cur->{data} ? "$cur->{data}\n$v" : $v;
        } else {
            $cur->{$f} = $v;
        }
    }
}

1;
