#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# Configuration of the rate limits: "nginx -t" fails with [emerg], a
# message naming the problem and "in .../nginx.conf:LINE" of the offending
# directive; a valid configuration using every form passes and behaves:
# inheritance (a level without civicgate_limit inherits its parent's
# limits), civicgate_limit_log_level, status codes at the bounds.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new(redis => 0);

sub server {
    my ($loc) = @_;
    return <<"EOF";
    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;
        location / {
            $loc
            alias %%TESTDIR%%/file.txt;
        }
    }
EOF
}

my $ZONE = 'civicgate_limit_zone $binary_remote_addr zone=one:1m rate=1r/s;';
my $USE = 'civicgate_limit zone=one;';

# name, http block, regex of the offending line, regex of the message
my @cases = (
    [ 'rate=0',
      "civicgate_limit_zone \$binary_remote_addr zone=one:1m rate=0r/s;\n"
          . server($USE),
      qr/rate=0r\/s/, qr/invalid parameter "rate=0r\/s"/ ],
    [ 'rate=abc',
      "civicgate_limit_zone \$binary_remote_addr zone=one:1m rate=abc;\n"
          . server($USE),
      qr/rate=abc/, qr/invalid parameter "rate=abc"/ ],
    [ 'rate=abcr/s',
      "civicgate_limit_zone \$binary_remote_addr zone=one:1m rate=abcr/s;\n"
          . server($USE),
      qr/rate=abcr\/s/, qr/invalid parameter "rate=abcr\/s"/ ],
    [ 'rate=5r/h (no such unit)',
      "civicgate_limit_zone \$binary_remote_addr zone=one:1m rate=5r/h;\n"
          . server($USE),
      qr/rate=5r\/h/, qr/invalid parameter "rate=5r\/h"/ ],
    [ 'rate=-1r/s',
      "civicgate_limit_zone \$binary_remote_addr zone=one:1m rate=-1r/s;\n"
          . server($USE),
      qr/rate=-1r\/s/, qr/invalid parameter "rate=-1r\/s"/ ],
    [ 'no rate',
      "civicgate_limit_zone \$binary_remote_addr zone=one:1m;\n"
          . server($USE),
      qr/civicgate_limit_zone/, qr/rate/ ],
    [ 'unknown zone',
      "$ZONE\n" . server('civicgate_limit zone=nosuch;'),
      qr/zone=nosuch/, qr/unknown civicgate_limit_zone "nosuch"/ ],
    [ 'zone too small (1k)',
      "civicgate_limit_zone \$binary_remote_addr zone=x:1k rate=1r/s;\n"
          . server('civicgate_limit zone=x;'),
      qr/zone=x:1k/, qr/zone "[^"]*x[^"]*" is too small/ ],
    [ 'zone too small (31k)',
      "civicgate_limit_zone \$binary_remote_addr zone=x:31k rate=1r/s;\n"
          . server('civicgate_limit zone=x;'),
      qr/zone=x:31k/, qr/is too small/ ],
    [ 'zone without size',
      "civicgate_limit_zone \$binary_remote_addr zone=x rate=1r/s;\n"
          . server('civicgate_limit zone=x;'),
      qr/zone=x rate/, qr/invalid parameter "zone=x"|zone/ ],
    [ 'store=redis without civicgate_redis',
      "civicgate_limit_zone \$binary_remote_addr zone=rz:1m rate=1r/s "
          . "store=redis;\n" . server('civicgate_limit zone=rz;'),
      qr/store=redis/, qr/"rz".*civicgate_redis|civicgate_redis.*"rz"/ ],
    [ 'invalid zone name (upper case)',
      "civicgate_limit_zone \$binary_remote_addr zone=Bad:1m rate=1r/s;\n"
          . server('civicgate_limit zone=Bad;'),
      qr/zone=Bad:1m/, qr/invalid zone name "Bad"/ ],
    [ 'invalid zone name (dot)',
      "civicgate_limit_zone \$binary_remote_addr zone=a.b:1m rate=1r/s;\n"
          . server('civicgate_limit zone=a.b;'),
      qr/zone=a\.b:1m/, qr/invalid zone name "a\.b"/ ],
    [ 'invalid zone name (65 chars)',
      "civicgate_limit_zone \$binary_remote_addr zone=" . ('z' x 65)
          . ":1m rate=1r/s;\n" . server('civicgate_limit zone=' . ('z' x 65)
          . ';'),
      qr/civicgate_limit_zone/, qr/invalid zone name/ ],
    [ 'duplicate zone (same size)',
      "$ZONE\ncivicgate_limit_zone \$http_x_key zone=one:1m rate=2r/s;\n"
          . server($USE),
      qr/\$http_x_key zone=one:1m/, qr/duplicate zone "one"/ ],
    [ 'duplicate zone (other size)',
      "$ZONE\ncivicgate_limit_zone \$http_x_key zone=one:2m rate=2r/s;\n"
          . server($USE),
      qr/zone=one:2m/, qr/duplicate zone "one"/ ],
    [ 'unknown civicgate_limit_zone parameter',
      "civicgate_limit_zone \$binary_remote_addr zone=one:1m rate=1r/s "
          . "foo=bar;\n" . server($USE),
      qr/foo=bar/, qr/invalid parameter "foo=bar"/ ],
    [ 'store=bogus',
      "civicgate_limit_zone \$binary_remote_addr zone=one:1m rate=1r/s "
          . "store=bogus;\n" . server($USE),
      qr/store=bogus/, qr/invalid parameter "store=bogus"/ ],
    [ 'on_error=bogus',
      "civicgate_limit_zone \$binary_remote_addr zone=one:1m rate=1r/s "
          . "on_error=bogus;\n" . server($USE),
      qr/on_error=bogus/, qr/invalid parameter "on_error=bogus"/ ],
    [ 'civicgate_limit_zone in a server',
      "server { listen 127.0.0.1:%%PORT_0%%;\n$ZONE }\n",
      qr/civicgate_limit_zone/, qr/"civicgate_limit_zone" directive is not allowed here/ ],
    [ 'civicgate_limit without zone=',
      "$ZONE\n" . server('civicgate_limit burst=5;'),
      qr/burst=5;/, qr/civicgate_limit.*zone|zone.*civicgate_limit/ ],
    [ 'civicgate_limit zone= empty',
      "$ZONE\n" . server('civicgate_limit zone=;'),
      qr/zone=;/, qr/zone/ ],
    [ 'burst=abc',
      "$ZONE\n" . server('civicgate_limit zone=one burst=abc;'),
      qr/burst=abc/, qr/invalid parameter "burst=abc"/ ],
    [ 'burst=-1',
      "$ZONE\n" . server('civicgate_limit zone=one burst=-1;'),
      qr/burst=-1/, qr/invalid parameter "burst=-1"/ ],
    [ 'burst= empty',
      "$ZONE\n" . server('civicgate_limit zone=one burst=;'),
      qr/burst=;/, qr/invalid parameter "burst="/ ],
    [ 'delay=abc',
      "$ZONE\n" . server('civicgate_limit zone=one burst=5 delay=abc;'),
      qr/delay=abc/, qr/invalid parameter "delay=abc"/ ],
    [ 'nodelay and delay=',
      "$ZONE\n" . server('civicgate_limit zone=one burst=5 nodelay delay=2;'),
      qr/nodelay delay=2/, qr/invalid parameter "delay=2"/ ],
    [ 'unknown civicgate_limit parameter',
      "$ZONE\n" . server('civicgate_limit zone=one fast;'),
      qr/zone=one fast/, qr/invalid parameter "fast"/ ],
    [ 'nine limits in a location',
      join('', map { "civicgate_limit_zone \$binary_remote_addr zone=z$_:1m "
          . "rate=1r/s;\n" } 1 .. 9)
          . server(join("\n", map { "civicgate_limit zone=z$_;" } 1 .. 9)),
      qr/civicgate_limit zone=z9;/, qr/civicgate_limit/ ],
    [ 'civicgate_limit_status 200',
      "$ZONE\n" . server("$USE civicgate_limit_status 200;"),
      qr/civicgate_limit_status 200/, qr/between 400 and 599|civicgate_limit_status/ ],
    [ 'civicgate_limit_status 399',
      "$ZONE\n" . server("$USE civicgate_limit_status 399;"),
      qr/civicgate_limit_status 399/, qr/between 400 and 599|civicgate_limit_status/ ],
    [ 'civicgate_limit_status 600',
      "$ZONE\n" . server("$USE civicgate_limit_status 600;"),
      qr/civicgate_limit_status 600/, qr/between 400 and 599|civicgate_limit_status/ ],
    [ 'civicgate_limit_status abc',
      "$ZONE\n" . server("$USE civicgate_limit_status abc;"),
      qr/civicgate_limit_status abc/, qr/civicgate_limit_status|"abc"/ ],
    [ 'civicgate_limit_log_level debug',
      "$ZONE\n" . server("$USE civicgate_limit_log_level debug;"),
      qr/civicgate_limit_log_level/, qr/civicgate_limit_log_level|"debug"/ ],
    [ 'civicgate_limit_dry_run maybe',
      "$ZONE\n" . server("$USE civicgate_limit_dry_run maybe;"),
      qr/civicgate_limit_dry_run/, qr/civicgate_limit_dry_run|"maybe"/ ],
    [ 'civicgate_limit_headers maybe',
      "$ZONE\n" . server("$USE civicgate_limit_headers maybe;"),
      qr/civicgate_limit_headers/, qr/civicgate_limit_headers|"maybe"/ ],
);

my $n = 0;
for my $c (@cases) {
    my ($name, $http, $line_re, $msg_re) = @$c;
    my $i = $t->nginx('case' . ++$n);
    $i->write_file('file.txt', "static\n");
    $i->write_nginx_conf($http);
    my ($rc, $out) = $i->test_config;
    my $conf = $i->testdir . '/nginx.conf';
    my $ln = $i->conf_line($line_re);
    subtest "nginx -t fails: $name" => sub {
        isnt($rc, 0, 'non-zero exit');
        like($out, qr/\[emerg\]/, '[emerg]');
        like($out, $msg_re, 'names the problem');
        ok(defined $ln, 'the offending line is in the config');
        my $want = $ln // 0;
        like($out, qr/ in \Q$conf\E:$want\b/,
            'points at nginx.conf:' . ($ln // '?'));
        unlike($out, qr/test is successful/, 'not successful');
    } or diag $out;
}

###########################################################################
# a valid configuration with every form

{
    my $v = $t->nginx('valid');
    $v->write_file('file.txt', "static\n");
    my $conf = <<'EOF';
    # used before it is declared, at http level: inherited by every server
    civicgate_limit zone=late burst=1000 nodelay;
    civicgate_limit_headers on;

    civicgate_limit_zone $http_x_key zone=late:32k rate=100r/s store=local
                         on_error=deny;
    civicgate_limit_zone $http_x_key zone=srv:1m rate=1r/m;
    civicgate_limit_zone $http_x_key zone=own:1m rate=60r/m store=local
                         on_error=allow;
    civicgate_limit_zone $http_x_key zone=lw:1m rate=10r/s;
    civicgate_limit_zone $http_x_key zone=li:1m rate=10r/s;
    civicgate_limit_zone $http_x_key zone=s4:1m rate=1r/s;
    civicgate_limit_zone $http_x_key zone=s5:1m rate=1r/s;
    civicgate_limit_zone $http_x_key zone=a_1-b:1m rate=1000r/s;
    civicgate_limit_zone $http_x_key zone=%%Z64%%:1m rate=1r/s;
    civicgate_limit_zone $http_x_key zone=e1:1m rate=10r/s;
    civicgate_limit_zone $http_x_key zone=e2:1m rate=10r/s;
    civicgate_limit_zone $http_x_key zone=e3:1m rate=10r/s;
    civicgate_limit_zone $http_x_key zone=e4:1m rate=10r/s;
    civicgate_limit_zone $http_x_key zone=e5:1m rate=10r/s;
    civicgate_limit_zone $http_x_key zone=e6:1m rate=10r/s;
    civicgate_limit_zone $http_x_key zone=e7:1m rate=10r/s;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_limit zone=srv burst=1 nodelay;

        location = /inherit {
            alias %%TESTDIR%%/file.txt;
        }
        location = /own {
            civicgate_limit zone=own burst=2 delay=1;
            alias %%TESTDIR%%/file.txt;
        }
        location = /eight {
            civicgate_limit zone=srv burst=100 nodelay;
            civicgate_limit zone=e1 burst=5 nodelay;
            civicgate_limit zone=e2 burst=5 nodelay;
            civicgate_limit zone=e3 burst=5 nodelay;
            civicgate_limit zone=e4 burst=5 nodelay;
            civicgate_limit zone=e5 burst=5 nodelay;
            civicgate_limit zone=e6 burst=5 nodelay;
            civicgate_limit zone=e7 burst=5 delay=5;
            alias %%TESTDIR%%/file.txt;
        }
        location = /warn {
            civicgate_limit zone=lw burst=1;
            civicgate_limit_log_level warn;
            civicgate_limit_status 400;
            alias %%TESTDIR%%/file.txt;
        }
        location = /info {
            civicgate_limit zone=li burst=1;
            civicgate_limit_log_level info;
            civicgate_limit_status 599;
            alias %%TESTDIR%%/file.txt;
        }
        location = /notice {
            civicgate_limit zone=s4;
            civicgate_limit_log_level notice;
            civicgate_limit_dry_run off;
            alias %%TESTDIR%%/file.txt;
        }
        location = /names {
            civicgate_limit zone=a_1-b burst=0 nodelay;
            civicgate_limit_headers off;
            alias %%TESTDIR%%/file.txt;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_1%%;
        server_name localhost;

        location = /http-level {
            alias %%TESTDIR%%/file.txt;
        }
    }
EOF
    # a zone name of 64 characters, the longest allowed
    $conf =~ s/%%Z64%%/'z' x 64/e;
    $v->write_nginx_conf($conf);
    my ($rc, $out) = $v->test_config;
    is($rc, 0, 'valid config (incl. a 64-character zone name, a 32k zone): '
        . 'nginx -t exits 0') or diag $out;
    like($out, qr/test is successful/, 'valid config: test is successful');
    unlike($out, qr/\[(?:emerg|alert|crit|warn)\]/, 'valid config: no '
        . 'warnings');
    $v->run;

    my $get = sub {
        my ($path, $key, %o) = @_;
        return $v->request($path, headers => [ 'X-Key' => $key ], %o);
    };

    # inheritance: /inherit has no civicgate_limit -> the server's (srv);
    # the server's civicgate_limit replaces the http-level one (late)
    my $r = $get->('/inherit', 'i1');
    is($r->header('RateLimit-Policy'), '"srv";q=1;w=60',
        'a location without civicgate_limit inherits the server\'s limits '
        . '(and the server replaced the http-level ones)');
    is($get->('/inherit', 'i1')->status, 200, 'inherited: burst=1: 2nd passes');
    is($get->('/inherit', 'i1')->status, 429, 'inherited: 3rd rejected');

    $r = $get->('/own', 'i1');
    is($r->header('RateLimit-Policy'), '"own";q=60;w=60',
        'a location with its own civicgate_limit has only its own');
    is($r->status, 200, 'own limit: the key limited at server level passes');

    $r = $v->request('/http-level', port => $v->port(1),
        headers => [ 'X-Key' => 'i1' ]);
    is($r->header('RateLimit-Policy'), '"late";q=100;w=1',
        'a server without civicgate_limit inherits the http-level limit '
        . '(declared before its zone)');

    $r = $get->('/eight', 'e');
    is($r->status, 200, 'eight limits in one location');
    is($r->header('RateLimit-Policy'), join(', ', '"srv";q=1;w=60',
        map { "\"e$_\";q=10;w=1" } 1 .. 7),
        'eight limits: eight RateLimit-Policy items, in order');
    my @items = split /, /, $r->header('RateLimit') // '';
    is(scalar @items, 8, 'eight RateLimit items');

    $r = $get->('/names', 'n');
    is($r->status, 200, 'zone name with _ and -');
    is($r->header('RateLimit'), undef, 'civicgate_limit_headers off in a '
        . 'location overrides the http-level on');

    # log levels; status codes at the bounds
    # burst=1 without nodelay: 1 passes, then 2 at once: one delayed, one
    # rejected
    my $pair = sub {
        my ($path, $key) = @_;
        my $first = $get->($path, $key)->status;
        my $req = "GET $path HTTP/1.1\r\nHost: localhost\r\n"
            . "Connection: close\r\nX-Key: $key\r\n\r\n";
        my @r = http_burst([ $req, $req ], port => $v->port(0));
        return join ' ', $first,
            sort map { parse_response($_)->status } @r;
    };
    my $mark = $v->log_mark;
    is($pair->('/warn', 'w'), '200 200 400', 'civicgate_limit_status 400');
    my $log = $v->log_since($mark);
    like($log, qr/\[notice\][^\n]*civicgate: delaying request by \d+ms/,
        'log_level warn: delays at notice');
    like($log, qr/\[warn\][^\n]*civicgate: limiting requests, excess: [\d.]+ by zone "lw"/,
        'log_level warn: rejections at warn');

    $mark = $v->log_mark;
    is($pair->('/info', 'i'), '200 200 599', 'civicgate_limit_status 599');
    $log = $v->log_since($mark);
    like($log, qr/\[info\][^\n]*civicgate: delaying request by \d+ms/,
        'log_level info: delays at info too');
    like($log, qr/\[info\][^\n]*civicgate: limiting requests, excess: [\d.]+ by zone "li"/,
        'log_level info: rejections at info');

    $mark = $v->log_mark;
    my @st = map { $get->('/notice', 'no')->status } 1 .. 2;
    is("@st", '200 429', 'dry_run off: enforced');
    like($v->log_since($mark), qr/\[notice\][^\n]*civicgate: limiting requests, excess: [\d.]+ by zone "s4"/,
        'log_level notice: rejections at notice');

    my $m = $v->metrics;
    ok(defined metric($m, 'civicgate_limit_requests_total', zone => 'a_1-b',
        result => 'passed'), 'metrics carry every zone');
    ok(defined metric($m, 'civicgate_limit_fallbacks_total', zone => 'late',
        on_error => 'deny'), 'fallback metric labelled with on_error');
    ok(defined metric($m, 'civicgate_limit_fallbacks_total', zone => 'own',
        on_error => 'allow'), 'fallback metric: on_error=allow');
    ok(defined metric($m, 'civicgate_limit_fallbacks_total', zone => 'srv',
        on_error => 'local'), 'fallback metric: default on_error=local');
}

$t->done_testing;
