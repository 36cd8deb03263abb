#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The JSON access log format of docs/logging.md, taken from the document as
# written: the examples use the same text, and a gateway using it writes one
# line per request that parses as a JSON object with exactly the documented
# fields and the values each request should give (channel, journey,
# pseudonym, service, status, limit and consent decisions, times), also for
# hostile header values, and never the raw citizen identifier.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use Civicgate::Test qw(:all);
use JSON::PP;

my $t = Civicgate::Test->new;

my $TOP = "$FindBin::Bin/..";

sub slurp {
    my ($path) = @_;
    open my $fh, '<', $path or die "$path: $!";
    local $/;
    return scalar <$fh>;
}

# "log_format civicgate_json ...;" up to the end of its last quoted part,
# each line without its indentation
sub log_format_of {
    my ($text) = @_;
    my ($f) = $text =~ /^([ \t]*log_format\s+civicgate_json\b.*?';)[ \t]*$/ms;
    return undef unless defined $f;
    $f =~ s/^[ \t]+//mg;
    return $f;
}

my ($block) = slurp("$TOP/docs/logging.md")
    =~ /^```nginx\n((?:(?!```).)*?log_format\s+civicgate_json.*?)^```/ms;
my $FORMAT = log_format_of($block // '');
ok(defined $FORMAT, 'docs/logging.md: the civicgate_json log_format')
    or BAIL_OUT('no log_format civicgate_json in docs/logging.md');
like($FORMAT, qr/\bescape=json\b/, 'the format escapes values for JSON');

my @examples = sort(glob("$TOP/examples/*.conf"),
    glob("$TOP/examples/*/*.conf"));
for my $file (@examples) {
    my $f = log_format_of(slurp($file)) // next;
    (my $rel = $file) =~ s{^\Q$TOP\E/}{};
    is($f, $FORMAT, "$rel: the documented format, as written");
}

my @FIELDS = qw(time channel journey_id citizen service method status
    limit_status consent_status request_time upstream_time);

###########################################################################

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);
$t->run_redis;

(my $format = $FORMAT) =~ s/^/    /mg;
$t->write_nginx_conf(<<'EOF' . $format . <<'EOF');
    civicgate_secret_file  %%TESTDIR%%/keys;
    civicgate_redis        redis://127.0.0.1:%%REDIS_PORT%%;
    civicgate_limit_zone   $civicgate_citizen  zone=citizen:1m  rate=1r/m;
    civicgate_consent_purposes {
        health_records  "Rekam medis"  "Health records";
    }

EOF

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        access_log %%TESTDIR%%/civicgate.log civicgate_json;

        civicgate_channel  $http_x_channel;
        civicgate_citizen  $http_x_citizen_id;
        civicgate_journey  on;

        location /api/open/ {
            civicgate_service  open-data;
            proxy_pass         http://127.0.0.1:%%PORT_1%%;
        }

        location /api/permits/ {
            civicgate_service  permits;
            civicgate_limit    zone=citizen;
            proxy_pass         http://127.0.0.1:%%PORT_1%%;
        }

        location /api/health-records/ {
            civicgate_service  health-records;
            civicgate_consent  health_records;
            proxy_pass         http://127.0.0.1:%%PORT_1%%;
        }

        location /consents/ {
            civicgate_consent_api;
            civicgate_service  consents;
        }

        location / {
            return 404;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_1%%;
        access_log off;
        location / {
            return 200 "agency\n";
        }
    }
EOF
$t->run;

my $C = '3171' . join '', map { int rand 10 } 1 .. 12;
my $P = pseudonym($KEY, $C);
my $J;

# [ path, headers, method, expected fields (undef: not checked here) ]
my @cases = (
    [ '/api/open/a', { channel => 'web', citizen => 1 }, 'GET',
      { status => '200', channel => 'web', citizen => $P,
        service => 'open-data', limit_status => '', consent_status => '',
        upstream => 1 } ],
    [ '/api/permits/b', { channel => 'app', citizen => 1 }, 'GET',
      { status => '200', channel => 'app', service => 'permits',
        limit_status => 'PASSED', consent_status => '', upstream => 1 } ],
    [ '/api/permits/b', { channel => 'APP', citizen => 1 }, 'GET',
      { status => '429', channel => 'app', limit_status => 'REJECTED',
        consent_status => '', upstream => 0 } ],
    [ '/api/health-records/c', { channel => 'sms', citizen => 1 }, 'GET',
      { status => '403', channel => 'sms', service => 'health-records',
        limit_status => '', consent_status => 'DENIED', upstream => 0 } ],
    [ '/api/health-records/c', { channel => 'sms' }, 'GET',
      { status => '401', citizen => '', consent_status => 'MISSING_CITIZEN',
        upstream => 0 } ],
    [ '/consents/health_records', { channel => 'app', citizen => 1 }, 'PUT',
      { status => '201', service => 'consents', limit_status => '',
        consent_status => '', upstream => 0 } ],
    [ '/api/health-records/c', { channel => 'counter', citizen => 1 }, 'GET',
      { status => '200', channel => 'counter', consent_status => 'GRANTED',
        upstream => 1 } ],
    # hostile values: a quote and a backslash in the channel and in the
    # journey ID; neither reaches the log as sent
    [ '/nowhere', { channel => "web\",\"x\":\"1\\", journey => "\"}\\" },
      'GET',
      { status => '404', channel => 'unknown', citizen => '', service => '',
        limit_status => '', consent_status => '', upstream => 0,
        new_journey => 1 } ],
);

my @sent;
for my $c (@cases) {
    my ($path, $h, $method, $want) = @$c;
    my @h = ('X-Channel' => $h->{channel});
    push @h, 'X-Citizen-Id' => $C if $h->{citizen};
    push @h, 'X-Journey-ID' => $h->{journey} // $J if $h->{journey} // $J;
    my $r = $t->request($path, headers => \@h, method => $method,
        ($method eq 'PUT' ? (body => '') : ()));
    is($r->status, $want->{status}, "$method $path: $want->{status}");
    $J //= $r->header('X-Journey-ID');
    push @sent, [ $c, $r ];
}

# Redis down: a consent that is not cached cannot be checked
{
    $t->stop_redis;
    my $r = $t->request('/api/health-records/d',
        headers => [ 'X-Channel' => 'email', 'X-Citizen-Id' => "$C-other",
            'X-Journey-ID' => $J ]);
    is($r->status, 503, 'Redis down, consent not cached: 503');
    push @sent, [ [ '/api/health-records/d', {}, 'GET',
        { status => '503', channel => 'email',
          citizen => pseudonym($KEY, "$C-other"),
          consent_status => 'ERROR', upstream => 0 } ], $r ];
}

my $n = @sent;
my $log = $t->wait_for_log(qr/\A((?:[^\n]*\n){$n})\z/,
    file => 'civicgate.log', timeout => 3);
ok(defined $log, "$n lines in the access log")
    or diag $t->read_file('civicgate.log');
my @lines = split /\n/, $log // '';

my $json = JSON::PP->new;
for my $i (0 .. $#sent) {
    my ($c, $r) = @{ $sent[$i] };
    my ($path, $h, $method, $want) = @$c;
    my $line = $lines[$i] // '';
    my $what = "line " . ($i + 1) . " ($method $path $want->{status})";

    my $o = eval { $json->decode($line) };
    ok(ref $o eq 'HASH', "$what: a JSON object") or do {
        diag "$@$line";
        next;
    };
    is_deeply([ sort keys %$o ], [ sort @FIELDS ], "$what: the fields");

    my %want = (
        status => $want->{status},
        method => $method,
        journey_id => $r->header('X-Journey-ID'),
        channel => $want->{channel},
        citizen => exists $want->{citizen} ? $want->{citizen}
            : ($h->{citizen} ? $P : ''),
        service => $want->{service},
        limit_status => $want->{limit_status},
        consent_status => $want->{consent_status},
    );
    delete @want{ grep { !defined $want{$_} } keys %want };
    is_deeply({ map { $_ => $o->{$_} } keys %want }, \%want,
        "$what: the values");

    like($o->{journey_id}, journey_id_re(), "$what: a canonical journey ID");
    isnt($o->{journey_id}, $J, "$what: a new journey") if $want->{new_journey};
    like($o->{time}, qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$/,
        "$what: ISO 8601 time");
    like($line, qr/"request_time":\d+\.\d{3}[,}]/,
        "$what: request_time is a number");
    if ($want->{upstream}) {
        like($o->{upstream_time}, qr/^\d+\.\d{3}$/, "$what: upstream_time");
    } else {
        is($o->{upstream_time}, '', "$what: no upstream_time");
    }
}

unlike($log // '', qr/\Q$C\E/, 'the raw citizen identifier is never logged');
like(join('', @lines[0 .. 6]), qr/\Q$P\E/, 'the pseudonym is');

$t->done_testing;
