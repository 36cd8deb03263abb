#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The status endpoint as JSON: its shape, the services in configuration
# order, both languages (?lang, Accept-Language with q values, the
# configured default, lang=all, fallback to the other language), the
# overall state, strong ETags and 304s, HEAD, 405; the admin endpoints
# that set and clear a service's state, their validation (nothing stored
# on a bad request), and the Redis keys and pub/sub messages they write.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use POSIX qw(strftime);
use Time::HiRes qw(time sleep);
use Time::Local qw(timegm);
use Civicgate::Test qw(:all);
use Civicgate::Status qw(:all);

my $t = Civicgate::Test->new;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);

$t->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        location /tax/ {
            civicgate_service tax;
            return 200 "tax\n";
        }
        location /health/ {
            civicgate_service health-records;
            return 200 "health\n";
        }
        location /permits/ {
            civicgate_service permits;
            return 200 "permits\n";
        }
        location /tax-forms/ {
            civicgate_service tax;
            return 200 "tax forms\n";
        }
        location /status/ {
            civicgate_status;
        }
        location /en/status/ {
            civicgate_status;
            civicgate_status_language en;
        }
        location /civicgate/admin/ {
            civicgate_admin;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_1%%;
        server_name localhost;
        civicgate_status_language en;

        location /land/ {
            civicgate_service land-registry;
            return 200 "land\n";
        }
        location /status {
            civicgate_status;
        }
    }
EOF

$t->run_redis;
$t->run;

my @SERVICES = qw(tax health-records permits land-registry);
my $TS_RE = qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z$/;
my $TS_MS_RE = qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;
my $SID_RE = qr/^\d+-\d+$/;

sub rfc3339 { strftime('%Y-%m-%dT%H:%M:%SZ', gmtime $_[0]) }

sub parse_ts {
    my ($s) = @_;
    return undef unless defined $s && $s =~
        /^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?(Z|([+-])(\d\d):(\d\d))$/;
    my $t = timegm($6, $5, $4, $3, $2 - 1, $1) + ($7 // 0);
    $t -= ($9 eq '-' ? -1 : 1) * ($10 * 3600 + $11 * 60) if $8 ne 'Z';
    return $t;
}

sub get {
    my ($path, @h) = @_;
    my %o = (headers => \@h);
    $o{port} = $t->port(1) if $path =~ s/^:1//;
    return $t->request($path, %o);
}

sub status_of {
    my ($path, @h) = @_;
    my $r = get($path, @h);
    return (json_of($r), $r);
}

# a change, then until the status document shows it (the worker learns of
# its own changes through Redis pub/sub, like every other worker)
sub admin {
    my ($method, $name, $body) = @_;
    my $r = admin_service($t, $method, $name, $body,
        headers => [ 'Content-Type' => 'application/json' ]);
    return $r unless $r->status == 200;
    my $a = json_of($r) // {};
    $t->wait_until(sub {
        my ($d) = status_of('/status/?lang=all');
        my $s = service_of($d, $name);
        $s && ($s->{updated_at} // '') eq ($a->{updated_at} // '')
            && $s->{state} eq ($a->{state} // '-')
            && ($d->{updated_at} // '') ge ($a->{updated_at} // '');
    }, timeout => 3) or diag "$method $name: not visible within 3 s";
    return $r;
}

sub check_problem {
    my ($r, $status, $name) = @_;
    is($r->status, $status, "$name: $status") or diag $r->raw;
    like($r->header('Content-Type') // '', qr{^application/problem\+json\b},
        "$name: application/problem+json");
    my $p = json_of($r);
    ok(ref $p eq 'HASH' && ($p->{status} // 0) == $status
        && ($p->{type} // '') =~ /^urn:civicgate:problem:/
        && length($p->{title} // ''), "$name: problem with type, title, status")
        or diag $r->body;
    return $p;
}

sub redis_state {
    return [ $t->redis_hash('cg:{status}:services'),
        $t->redis_query('XLEN', 'cg:{status}:history') // 0 ];
}

###########################################################################
# nginx -t: civicgate_status needs civicgate_redis

{
    my $c = $t->nginx('conf');
    $c->write_nginx_conf(<<'EOF');
    server {
        listen 127.0.0.1:%%PORT_conf%%;
        location /status/ {
            civicgate_status;
        }
    }
EOF
    my ($rc, $out) = $c->test_config;
    isnt($rc, 0, 'nginx -t: civicgate_status without civicgate_redis fails');
    like($out, qr/civicgate_status.*civicgate_redis/,
        'nginx -t names civicgate_redis') or diag $out;

    $c->write_nginx_conf(<<'EOF');
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;
    server {
        listen 127.0.0.1:%%PORT_conf%%;
        civicgate_status_history 10;
        location /status/ {
            civicgate_status;
        }
    }
EOF
    ($rc, $out) = $c->test_config;
    isnt($rc, 0, 'nginx -t: civicgate_status_history is http-only');
    like($out, qr/civicgate_status_history.*not allowed/, 'nginx -t says why')
        or diag $out;
}

###########################################################################
# no change ever: every configured service, operational

my $ETAG0;
{
    # the worker connects to Redis shortly after the start
    my $d;
    ok($t->wait_until(sub {
        ($d) = status_of('/status/');
        fresh($d);
    }, timeout => 5), 'status not stale once the worker reached Redis')
        or diag explain $d;

    my $r = get('/status/');
    is($r->status, 200, 'GET /status/: 200');
    like($r->header('Content-Type') // '', qr{^application/json\b},
        'application/json');
    like($r->header('ETag') // '', qr/^"[^"]+"$/, 'a strong ETag');
    $ETAG0 = $r->header('ETag');
    like($r->header('Cache-Control') // '', qr/\bno-cache\b/,
        'Cache-Control: no-cache');
    like($r->header('Vary') // '', qr/\bAccept-Language\b/i,
        'Vary: Accept-Language');
    is($r->header('Content-Language'), 'id', 'Content-Language: id (default)');
    unlike($r->body, qr/\n./, 'the JSON is on one line');

    $d = json_of($r);
    is_deeply([ sort keys %{ $d // {} } ],
        [ qw(lang overall services stale updated_at) ], 'top-level members');
    is($d->{overall}, 'operational', 'overall operational');
    is($d->{lang}, 'id', 'lang id');
    ok(fresh($d), 'stale false');
    ok(exists $d->{updated_at} && !defined $d->{updated_at},
        'updated_at null: no change ever');
    is_deeply([ map { $_->{name} } @{ $d->{services} || [] } ], \@SERVICES,
        'services: the configured civicgate_service names, in configuration'
        . ' order, each once, from every server');
    is_deeply($d->{services}, [ map { { name => $_, state => 'operational',
        message => undef, since => undef, until => undef,
        updated_at => undef } } @SERVICES ],
        'every service operational, no message, since, until, updated_at');
    is(get(':1/status/')->body, (my $x = $r->body) =~ s/"lang":"id"/"lang":"en"/r,
        'another server, same services (its default language en)');
}

###########################################################################
# the location's name without the slash

{
    my $r = get('/status');
    ok($r->status == 200 && $r->body eq get('/status/')->body
        || $r->status == 301 && ($r->header('Location') // '') =~ m{/status/$},
        'location /status/: GET /status answers (or redirects to /status/)')
        or diag $r->raw;
    my $a = get(':1/status');
    is($a->status, 200, 'location /status: GET /status: 200');
    is($a->body, get(':1/status/')->body, '  the same as /status/');
    is(get(':1/statusx')->status, 404, '  /statusx: 404');
}

###########################################################################
# a change: PUT, its answer, the JSON, the ETag, the Redis keys

my ($SINCE, $UNTIL) = (int(time) - 3600, int(time) + 7200);
my %MSG = (id => 'Respons lambat', en => 'Slow responses');
my ($PUT1, $ETAG1);
{
    my $t0 = time;
    my $r = admin('PUT', 'health-records', { state => 'degraded',
        message => \%MSG, since => rfc3339($SINCE), until => rfc3339($UNTIL) });
    is($r->status, 200, 'admin PUT: 200') or diag $r->raw;
    like($r->header('Content-Type') // '', qr{^application/json\b},
        'admin PUT: application/json');
    my $a = $PUT1 = json_of($r) // {};
    is($a->{name}, 'health-records', 'answer: name');
    like($a->{id} // '', $SID_RE, 'answer: id, a stream id');
    is($a->{state}, 'degraded', 'answer: state');
    is_deeply($a->{message}, \%MSG, 'answer: message in both languages');
    is(parse_ts($a->{since}), $SINCE, 'answer: since');
    is(parse_ts($a->{until}), $UNTIL, 'answer: until');
    like($a->{updated_at} // '', $TS_MS_RE, 'answer: updated_at, RFC 3339 ms');
    my $u = parse_ts($a->{updated_at});
    ok(defined $u && $u >= $t0 - 1 && $u <= time + 1, 'updated_at is now')
        or diag $a->{updated_at};

    my ($d, $g) = status_of('/status/?lang=en');
    is($d->{overall}, 'degraded', 'overall degraded');
    is($d->{updated_at}, $a->{updated_at}, 'updated_at: the last change');
    my $s = service_of($d, 'health-records');
    is($s->{state}, 'degraded', 'health-records degraded');
    is($s->{message}, $MSG{en}, 'message in English');
    like($s->{since} // '', $TS_RE, 'since RFC 3339');
    is(parse_ts($s->{since}), $SINCE, 'since as set');
    is(parse_ts($s->{until}), $UNTIL, 'until as set');
    is($s->{updated_at}, $a->{updated_at}, 'updated_at as answered');
    is(service_of($d, 'tax')->{state}, 'operational', 'tax still operational');
    $ETAG1 = $g->header('ETag');
    like($ETAG1 // '', qr/^"[^"]+"$/, 'strong ETag');
    isnt(get('/status/')->header('ETag'), $ETAG0, 'a new ETag after a change');

    # Redis: the hash and the history stream
    my $h = $t->redis_query('HGET', 'cg:{status}:services', 'health-records');
    my ($hid, $hjson) = split / /, $h // '', 2;
    is($hid, $a->{id}, 'cg:{status}:services: "<stream id> <record>"');
    my $rec = json_of($hjson);
    is($rec && $rec->{state}, 'degraded', 'the record: state');
    is_deeply($rec && $rec->{message}, \%MSG, 'the record: message');
    ok($rec && !exists $rec->{updated_at},
        'the record: no time of its own (the id is the time)');
    {
        my ($ms) = ($a->{id} // '') =~ /^(\d+)-/;
        my @g = gmtime(int(($ms // 0) / 1000));
        my $want = sprintf('%04d-%02d-%02dT%02d:%02d:%02d.%03dZ',
            $g[5] + 1900, $g[4] + 1, @g[3, 2, 1, 0], ($ms // 0) % 1000);
        is($a->{updated_at}, $want, 'the answer: updated_at is the id\'s time');
    }
    my $hist = $t->redis_stream('cg:{status}:history');
    is(scalar @$hist, 1, 'cg:{status}:history: one entry');
    is($hist->[-1]{id}, $a->{id}, 'history entry id = the answer id');
    is_deeply($hist->[-1]{names}, [ qw(service record) ],
        'history fields: service, record');
    is($hist->[-1]{f}{service}, 'health-records', 'history: service');
    is($hist->[-1]{f}{record}, $hjson, 'history: the same record JSON');
}

###########################################################################
# pub/sub: cg:{status}:changes carries "<id>\n<name>\n<record>"

{
    my $sub = $t->redis_subscribe('cg:{status}:changes');
    my $r = admin('PUT', 'tax', { state => 'maintenance' });
    my $a = json_of($r) // {};
    is($r->status, 200, 'admin PUT tax maintenance: 200');
    my $m = $sub->next(3);
    ok($m, 'a message on cg:{status}:changes');
    my ($mid, $mname, $mrec) = split /\n/, $m ? $m->[1] : '', 3;
    is($mid, $a->{id}, 'message: the change id first');
    is($mname, 'tax', 'message: the service name');
    my $hist = $t->redis_stream('cg:{status}:history');
    is($mrec, $hist->[-1]{f}{record}, 'message: the record, as in history');
    is((split / /, $t->redis_query('HGET', 'cg:{status}:services', 'tax'),
        2)[1], $mrec, 'message: the record, as in the hash');
    my $rec = json_of($mrec) // {};
    is($rec->{state}, 'maintenance', 'record: state maintenance');
    ok(!defined $rec->{message}, 'record: no message');
    my $sn = parse_ts($rec->{since});
    ok(defined $sn && abs($sn - time) < 5, 'since defaults to now')
        or diag $mrec;

    # a DELETE is a change too: history record empty
    $r = admin('DELETE', 'tax');
    is($r->status, 200, 'admin DELETE tax: 200') or diag $r->raw;
    like($r->header('Content-Type') // '', qr{^application/json\b},
        'admin DELETE: application/json');
    $a = json_of($r) // {};
    is($a->{name}, 'tax', 'DELETE answer: name');
    is($a->{state}, 'operational', 'DELETE answer: state operational');
    like($a->{id} // '', $SID_RE, 'DELETE answer: id');
    $m = $sub->next(3);
    is($m && $m->[1], "$a->{id}\ntax\n",
        'DELETE: message "<id>\\ntax\\n" (empty record)');
    $hist = $t->redis_stream('cg:{status}:history');
    is($hist->[-1]{id}, $a->{id}, 'DELETE: a history entry');
    is($hist->[-1]{f}{service}, 'tax', 'DELETE: history service');
    is($hist->[-1]{f}{record}, '', 'DELETE: history record empty');
    my ($d) = status_of('/status/');
    is_deeply(service_of($d, 'tax'), { name => 'tax',
        state => 'operational', message => undef, since => undef,
        until => undef, updated_at => service_of($d, 'tax')->{updated_at} },
        'DELETE: tax operational, no message, since, until');
    $sub->close;
}

###########################################################################
# languages

{
    # health-records: degraded, a message in both languages
    # permits: maintenance, a message in English only
    my $r = admin('PUT', 'permits', { state => 'maintenance',
        message => { en => 'Only English' } });
    is($r->status, 200, 'PUT a message in English only');

    my @cases = (
        # [ path, Accept-Language, expected language ]
        [ '/status/', undef, 'id' ],
        [ '/en/status/', undef, 'en' ],
        [ ':1/status/', undef, 'en' ],
        [ '/status/?lang=en', undef, 'en' ],
        [ '/en/status/?lang=id', undef, 'id' ],
        [ '/status/?lang=en', 'id', 'en' ],
        [ '/en/status/?lang=id', 'en', 'id' ],
        [ '/status/', 'en', 'en' ],
        [ '/en/status/', 'id', 'id' ],
        [ '/en/status/', 'in', 'id' ],
        [ '/status/', 'fr, en;q=0.5', 'en' ],
        [ '/status/', 'id;q=0.2, en;q=0.8', 'en' ],
        [ '/en/status/', 'en;q=0.3, id;q=0.7', 'id' ],
        [ '/en/status/', 'en;q=0.3,in;q=0.4', 'id' ],
        [ '/status/', 'id-ID,id;q=0.9,en-US;q=0.8,en;q=0.7', 'id' ],
        [ '/status/', 'EN', 'en' ],
        [ '/status/', 'en-GB', 'en' ],
        [ '/en/status/', 'in-ID', 'id' ],
        [ '/status/', 'id;q=0, en;q=0.1', 'en' ],
        [ '/status/', 'fr', 'id' ],
        [ '/en/status/', 'fr, de;q=0.5', 'en' ],
    );
    for my $c (@cases) {
        my ($path, $al, $want) = @$c;
        my $name = "$path" . (defined $al ? " Accept-Language: $al" : '');
        my ($d, $g) = status_of($path,
            (defined $al ? ('Accept-Language' => $al) : ()));
        my $got = join ' | ', $g->status, $d->{lang} // '-',
            $g->header('Content-Language') // '-',
            service_of($d, 'health-records')->{message} // '-',
            service_of($d, 'permits')->{message} // '-';
        is($got, join(' | ', 200, $want, $want, $MSG{$want}, 'Only English'),
            "$name: $want (lang, Content-Language, message; English"
            . ' fallback)');
    }

    my ($d, $g) = status_of('/status/?lang=all');
    is($g->status, 200, 'lang=all: 200');
    is($d->{lang}, 'all', 'lang=all: "lang":"all"');
    ok(!defined $g->header('Content-Language'), 'lang=all: no Content-Language');
    is_deeply(service_of($d, 'health-records')->{message}, \%MSG,
        'lang=all: message {"id":...,"en":...}');
    my $pm = service_of($d, 'permits')->{message};
    ok(ref $pm eq 'HASH' && ($pm->{en} // '') eq 'Only English'
        && !defined $pm->{id}, 'lang=all: a message in one language only')
        or diag explain $pm;
    my $tm = service_of($d, 'tax')->{message};
    ok(!defined $tm || (ref $tm eq 'HASH' && !grep { defined } values %$tm),
        'lang=all: no message') or diag explain $tm;
    ($d) = status_of('/status/?lang=all', 'Accept-Language' => 'en');
    is($d->{lang}, 'all', 'lang=all wins over Accept-Language');

    # strong ETags: different representations, different ETags
    my %etag;
    for my $l (qw(id en all)) {
        $etag{$l} = get("/status/?lang=$l")->header('ETag') // '';
    }
    is(scalar(keys %{ { reverse %etag } }), 3,
        'ETag differs between lang=id, lang=en and lang=all (strong)')
        or diag explain \%etag;
    is(get('/status/', 'Accept-Language' => 'en')->header('ETag'), $etag{en},
        'same representation, same ETag (Accept-Language en = ?lang=en)');
}

###########################################################################
# overall: outage > degraded > maintenance > operational

{
    admin('DELETE', $_) for @SERVICES;
    my @steps = (
        [ 'all operational', [], 'operational' ],
        [ 'permits maintenance', [ PUT => permits => 'maintenance' ],
            'maintenance' ],
        [ 'tax degraded', [ PUT => tax => 'degraded' ], 'degraded' ],
        [ 'health-records outage', [ PUT => 'health-records' => 'outage' ],
            'outage' ],
        [ 'land-registry maintenance', [ PUT => 'land-registry'
            => 'maintenance' ], 'outage' ],
        [ 'health-records cleared', [ DELETE => 'health-records' ],
            'degraded' ],
        [ 'tax cleared', [ DELETE => 'tax' ], 'maintenance' ],
        [ 'land-registry outage', [ PUT => 'land-registry' => 'outage' ],
            'outage' ],
        [ 'land-registry degraded', [ PUT => 'land-registry'
            => 'degraded' ], 'degraded' ],
        [ 'land-registry operational (PUT)', [ PUT => 'land-registry'
            => 'operational' ], 'maintenance' ],
        [ 'permits cleared', [ DELETE => 'permits' ], 'operational' ],
    );
    for my $s (@steps) {
        my ($name, $op, $want) = @$s;
        if (@$op) {
            my $r = admin($op->[0], $op->[1],
                $op->[0] eq 'PUT' ? { state => $op->[2] } : undef);
            is($r->status, 200, "$name: $op->[0] 200") or diag $r->raw;
        }
        my ($d) = status_of('/status/');
        is($d->{overall}, $want, "$name: overall $want");
    }
}

###########################################################################
# ETag, 304, HEAD, 405

{
    my $r = get('/status/');
    my $e = $r->header('ETag');
    like($e // '', qr/^"[^"]+"$/, 'ETag');
    for my $inm ($e, '*', qq{"nope", $e}, "W/$e") {
        my $n = get('/status/', 'If-None-Match' => $inm);
        is($n->status, 304, "If-None-Match: $inm -> 304");
        is($n->header('ETag'), $e, "  304 carries the ETag");
        is($n->body, '', '  304 has no body');
    }
    is(get('/status/', 'If-None-Match' => '"nope"')->status, 200,
        'If-None-Match not matching -> 200');
    is(get('/status/', 'If-None-Match' => $ETAG0)->status, 200,
        'If-None-Match with an old ETag -> 200');

    my $h = get('/status/');
    my $hd = $t->request('/status/', method => 'HEAD');
    is($hd->status, 200, 'HEAD: 200');
    is($hd->body, '', 'HEAD: no body');
    is($hd->header('ETag'), $h->header('ETag'), 'HEAD: the same ETag');
    like($hd->header('Content-Type') // '', qr{^application/json\b},
        'HEAD: application/json');
    is($hd->header('Content-Length') // length($h->body),
        length($h->body), 'HEAD: Content-Length of the GET body, if any');
    is($t->request('/status/', method => 'HEAD',
        headers => [ 'If-None-Match' => $h->header('ETag') ])->status, 304,
        'HEAD with a matching If-None-Match: 304');

    for my $m (qw(POST PUT DELETE PATCH)) {
        my $x = $t->request('/status/', method => $m,
            ($m =~ /^P/ ? (body => '{}') : ()));
        check_problem($x, 405, "$m /status/");
        my %allow = map { uc($_) => 1 } split /\s*,\s*/,
            $x->header('Allow') // '';
        ok($allow{GET} && $allow{HEAD} && keys %allow == 2,
            "$m /status/: Allow: GET, HEAD")
            or diag $x->header('Allow');
    }

    # every JSON answer has an ETag
    my @no;
    for my $p ('/status/', '/status/?lang=en', '/status/?lang=all',
        '/en/status/', ':1/status/')
    {
        my $x = get($p);
        push @no, $p unless $x->status == 200
            && ($x->header('ETag') // '') =~ /^"[^"]+"$/;
    }
    is_deeply(\@no, [], 'an ETag on every JSON answer');
}

###########################################################################
# admin validation: 400 naming the field, 404 unknown service, nothing
# stored

{
    my $before = redis_state();
    my $big = 'a' x 1001;
    my $euro = "\x{20ac}" x 334;                     # 1002 bytes, 334 chars
    my @bad = (
        [ 'state unknown', '{"state":"broken"}', 'state' ],
        [ 'state missing', '{}', 'state' ],
        [ 'state a number', '{"state":5}', 'state' ],
        [ 'state null', '{"state":null}', 'state' ],
        [ 'state "unknown"', '{"state":"unknown"}', 'state' ],
        [ 'since not a date', '{"state":"degraded","since":"yesterday"}',
            'since' ],
        [ 'since a number', '{"state":"degraded","since":1795990426}',
            'since' ],
        [ 'since month 13', '{"state":"degraded",'
            . '"since":"2026-13-01T00:00:00Z"}', 'since' ],
        [ 'until not a date', '{"state":"degraded","until":"soon"}',
            'until' ],
        [ 'until without a time zone', '{"state":"degraded",'
            . '"until":"2026-11-30T02:00:00"}', 'until' ],
        [ 'until before since', '{"state":"degraded",'
            . '"since":"2026-11-30T02:00:00Z","until":"2026-11-30T01:59:59Z"}',
            'until' ],
        [ 'message over 1000 bytes (en)', $JSON->encode({ state => 'outage',
            message => { id => 'x', en => $big } }), 'message' ],
        [ 'message over 1000 bytes (id)', $JSON->encode({ state => 'outage',
            message => { id => $big } }), 'message' ],
        [ 'message of 334 chars, 1002 bytes', $JSON->encode({ state =>
            'outage', message => { en => $euro } }), 'message' ],
        [ 'message a number', '{"state":"outage","message":5}', 'message' ],
        [ 'message text a number', '{"state":"outage","message":{"en":5}}',
            'message' ],
    );
    for my $b (@bad) {
        my ($name, $body, $field) = @$b;
        my $r = admin('PUT', 'tax', $body);
        my $p = check_problem($r, 400, "PUT $name");
        like($r->body, qr/\b\Q$field\E\b/, "PUT $name: names \"$field\"");
    }
    for my $b ([ 'a JSON array', '[{"state":"outage"}]' ],
        [ 'a JSON string', '"outage"' ], [ 'not JSON', 'state=outage' ],
        [ 'truncated JSON', '{"state":"outage"' ], [ 'empty', '' ],
        [ 'no body', undef ])
    {
        check_problem(admin('PUT', 'tax', $b->[1]), 400, "PUT $b->[0]");
    }
    is_deeply(redis_state(), $before, 'bad requests: nothing stored');

    for my $m (qw(PUT DELETE)) {
        my $r = admin($m, 'no-such-service',
            $m eq 'PUT' ? { state => 'outage' } : undef);
        my $p = check_problem($r, 404, "$m unknown service");
        like($p && $p->{type} // '', qr{unknown-service$},
            "$m unknown service: type .../unknown-service");
    }
    is_deeply(redis_state(), $before, 'unknown services: nothing stored');

    # limits: 1000 bytes of UTF-8 pass (500 two-byte characters)
    my $ok = "\x{e9}" x 500;
    my $r = admin('PUT', 'tax', $JSON->encode({ state => 'outage',
        message => { id => $ok, en => 'e' x 1000 } }));
    is($r->status, 200, 'message of exactly 1000 bytes in each language: 200')
        or diag $r->body;
    my ($d) = status_of('/status/?lang=id');
    is(service_of($d, 'tax')->{message}, $ok,
        'the 1000-byte UTF-8 message back');
    # the same bodies sent after the headers (not read with them): one
    # buffer whatever the size
    for my $b ([ 400, { en => $big }, 'over 1000 bytes' ],
        [ 200, { id => $ok, en => 'e' x 1000 }, 'exactly 1000 bytes' ])
    {
        my $body = $JSON->encode({ state => 'outage', message => $b->[1] });
        my $x = parse_response($t->http(undef, delay => 0.2, parts => [
            "PUT /civicgate/admin/services/tax HTTP/1.1\r\nHost: localhost\r\n"
            . "Connection: close\r\nContent-Type: application/json\r\n"
            . 'Content-Length: ' . length($body) . "\r\n\r\n", $body ]));
        is($x->status, $b->[0], "message $b->[2], the body read apart from"
            . " the headers: $b->[0]") or diag $x->body;
        like($x->body, qr/\bmessage\b/, '  naming "message"')
            if $b->[0] == 400;
    }
    # until equal to since is fine
    $r = admin('PUT', 'tax', { state => 'degraded',
        since => '2026-11-30T02:00:00Z', until => '2026-11-30T02:00:00Z' });
    is($r->status, 200, 'until equal to since: 200') or diag $r->body;
    # RFC 3339 with an offset and fractional seconds
    $r = admin('PUT', 'tax', { state => 'degraded',
        since => '2026-11-30T09:00:00.250+07:00',
        until => '2026-11-30T03:00:00Z' });
    is($r->status, 200, 'since with an offset and fraction: 200')
        or diag $r->body;
    my $a = json_of($r) // {};
    my $since = parse_ts($a->{since});
    ok(defined $since && abs($since - parse_ts('2026-11-30T02:00:00.250Z'))
        < 1, 'the same instant') or diag $a->{since};
}

$t->done_testing;
