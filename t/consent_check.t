#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The consent check at the door (precontent phase): a granted purpose
# passes and the request reaches the backend; a missing, withdrawn or
# expired consent gets 403 problem+json naming the first missing purpose
# in the directive's order, with both labels and the grant URL, in English
# or in Indonesian (Accept-Language); no identity gets 401; the cache
# (ttl=60s) never outlives a consent's expiry; $civicgate_consent_status;
# civicgate_consent_checks_total moves exactly; inheritance and "off".

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP ();
use POSIX qw(strftime);
use Time::HiRes qw(time sleep);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $JSON = JSON::PP->new->utf8;

my $KEY = random_key_hex(32);
$t->write_secret_file('keys', [ [ k1 => $KEY ] ]);
$t->write_file('html/index.html', "static research page\n");
$t->write_file('html/other.html', "other static page\n");

my $GRANT_URL = 'https://portal.example.go.id/consents?from=gateway';

$t->write_nginx_conf(<<'EOF', worker_processes => 2);
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;

    civicgate_consent_purposes {
        health   "Layanan kesehatan (BPJS)" "Health services (BPJS)";
        tax      "Perpajakan"               "Taxation";
        research "Penelitian ilmiah"        "Scientific research";
    }
    civicgate_consent_cache zone=consent:1m ttl=60s;
    civicgate_consent_grant_url https://portal.example.go.id/consents?from=gateway;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_citizen $http_x_citizen_id;
        civicgate_channel $http_x_channel;
        add_header X-Consent-Status $civicgate_consent_status always;

        location /health/ {
            civicgate_consent health;
            proxy_pass http://127.0.0.1:%%PORT_1%%/echo/health/;
        }
        location /two/ {
            civicgate_consent health tax;
            proxy_pass http://127.0.0.1:%%PORT_1%%/echo/two/;
        }
        location /taxhealth/ {
            civicgate_consent tax health;
            proxy_pass http://127.0.0.1:%%PORT_1%%/echo/taxhealth/;
        }
        location /research/ {
            civicgate_consent research;
            alias %%TESTDIR%%/html/;
        }
        location /inherit/ {
            civicgate_consent tax;
            location /inherit/on/ {
                proxy_pass http://127.0.0.1:%%PORT_1%%/echo/inherit-on/;
            }
            location /inherit/off/ {
                civicgate_consent off;
                proxy_pass http://127.0.0.1:%%PORT_1%%/echo/inherit-off/;
            }
        }
        location /plain/ {
            proxy_pass http://127.0.0.1:%%PORT_1%%/echo/plain/;
        }
        location /consents/ {
            civicgate_consent_api;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }

    server {
        listen 127.0.0.1:%%PORT_1%%;
        server_name backend;
        location /echo/ {
            return 200 "backend reached uri=$request_uri citizen=$http_x_citizen_id\n";
        }
    }
EOF

$t->run_redis;
$t->run;

my @PURPOSES = qw(health tax research);
my %LABEL = (
    health   => { id => 'Layanan kesehatan (BPJS)', en => 'Health services (BPJS)' },
    tax      => { id => 'Perpajakan', en => 'Taxation' },
    research => { id => 'Penelitian ilmiah', en => 'Scientific research' },
);

my $n_cit = 0;
sub new_citizen { sprintf 'CIT-%s-%02d', unpack('H*', random_bytes(4)), ++$n_cit }

sub req {
    my ($path, %o) = @_;
    my @h;
    push @h, 'X-Citizen-Id' => $o{citizen} if defined $o{citizen};
    push @h, 'Accept-Language' => $o{lang} if defined $o{lang};
    push @h, 'X-Channel' => $o{channel} // 'web';
    push @h, 'Content-Type' => 'application/json' if defined $o{body};
    return $t->request($path, headers => \@h,
        ($o{method} ? (method => $o{method}) : ()),
        (defined $o{body} ? (body => $o{body}) : ()));
}

sub json_of {
    my ($r) = @_;
    my $d = eval { $JSON->decode($r->body // '') };
    return ref $d eq 'HASH' ? $d : undef;
}

sub grant {
    my ($citizen, $purpose, $body) = @_;
    my $r = req("/consents/$purpose", method => 'PUT', citizen => $citizen,
        (defined $body ? (body => $body) : ()));
    is($r->status, 201, "PUT /consents/$purpose: 201")
        or diag $r->raw;
    return $r;
}

sub withdraw {
    my ($citizen, $purpose) = @_;
    my $r = req("/consents/$purpose", method => 'DELETE', citizen => $citizen);
    is($r->status, 200, "DELETE /consents/$purpose: 200") or diag $r->raw;
    return $r;
}

sub consent_metrics {
    my $m = $t->metrics or return undef;
    my %c;
    for my $p (@PURPOSES) {
        for my $res (qw(granted denied)) {
            $c{"$p/$res"} = metric($m, 'civicgate_consent_checks_total',
                purpose => $p, result => $res);
        }
    }
    return \%c;
}

# the change of every series since $before must be exactly %want (others 0)
sub metrics_moved {
    my ($before, $name, %want) = @_;
    my $now = consent_metrics();
    my (%got, %exp);
    for my $k (sort keys %$now) {
        $got{$k} = (defined $now->{$k} && defined $before->{$k})
            ? $now->{$k} - $before->{$k} : 'undef';
        $exp{$k} = $want{$k} // 0;
    }
    is_deeply(\%got, \%exp, "metrics: $name") or diag explain \%got;
    return $now;
}

sub hmget_calls {
    my $info = $t->redis_query('INFO', 'commandstats') // '';
    return $info =~ /^cmdstat_hmget:calls=(\d+)/m ? $1 : 0;
}

# checks the 403 problem for $purpose; $lang: 'en' or 'id'
my %TEXT;    # lang => { title, detail } seen
sub check_403 {
    my ($r, $purpose, $lang, $name) = @_;
    is($r->status, 403, "$name: 403") or diag $r->raw;
    like($r->header('Content-Type') // '', qr{^application/problem\+json\b},
        "$name: Content-Type application/problem+json");
    is($r->header('X-Consent-Status'), 'DENIED',
        "$name: \$civicgate_consent_status DENIED");
    unlike($r->body // '', qr/backend reached/, "$name: backend not reached");
    my $p = json_of($r);
    ok($p, "$name: body is a JSON object") or return;
    is($p->{type}, 'urn:civicgate:problem:consent-required', "$name: type");
    ok(JSON::PP::is_bool($p->{status}) ? 0 : ($p->{status} // '') =~ /^\d+$/,
        "$name: status is a number");
    is($p->{status}, 403, "$name: status 403");
    is($p->{purpose}, $purpose, "$name: purpose $purpose");
    is_deeply($p->{purpose_label}, $LABEL{$purpose},
        "$name: purpose_label {id, en}");
    is($p->{grant_url}, $GRANT_URL, "$name: grant_url");
    ok(defined $p->{title} && !ref $p->{title} && length $p->{title},
        "$name: title");
    ok(defined $p->{detail} && !ref $p->{detail} && length $p->{detail},
        "$name: detail");
    push @{ $TEXT{$lang}{title} }, $p->{title} // '';
    push @{ $TEXT{$lang}{detail} }, $p->{detail} // '';
    return $p;
}

sub check_pass {
    my ($r, $path, $name) = @_;
    is($r->status, 200, "$name: 200") or diag $r->raw;
    is($r->header('X-Consent-Status'), 'GRANTED',
        "$name: \$civicgate_consent_status GRANTED");
}

###########################################################################
# missing consent: 403, English and Indonesian

my $M0 = consent_metrics();
ok($M0, 'metrics endpoint answers');
is_deeply([ map { $M0->{$_} } sort keys %$M0 ], [ (0) x 6 ],
    'civicgate_consent_checks_total: every purpose/result exposed, all 0')
    or diag explain $M0;

my $C1 = new_citizen();
my $PS1 = pseudonym($KEY, $C1);
{
    my $m = consent_metrics();
    my $r = req('/health/a', citizen => $C1);
    check_403($r, 'health', 'en', 'missing consent (no Accept-Language)');
    $m = metrics_moved($m, 'missing: health denied +1',
        'health/denied' => 1);

    $r = req('/health/a', citizen => $C1, lang => 'en-US,en;q=0.8');
    check_403($r, 'health', 'en', 'missing consent (Accept-Language en-US)');
    $r = req('/health/a', citizen => $C1, lang => 'en-US, id;q=0.9');
    check_403($r, 'health', 'en',
        'missing consent (Accept-Language "en-US, id;q=0.9")');

    $r = req('/health/a', citizen => $C1, lang => 'id-ID');
    check_403($r, 'health', 'id', 'missing consent (Accept-Language id-ID)');
    $r = req('/health/a', citizen => $C1, lang => 'id');
    check_403($r, 'health', 'id', 'missing consent (Accept-Language id)');
    $r = req('/health/a', citizen => $C1, lang => 'id-ID,id;q=0.9,en;q=0.5');
    check_403($r, 'health', 'id',
        'missing consent (Accept-Language id-ID,id;q=0.9,en;q=0.5)');
    $r = req('/health/a', citizen => $C1, lang => 'in');
    check_403($r, 'health', 'id', 'missing consent (legacy Accept-Language in)');
    metrics_moved($m, 'six more denials of health', 'health/denied' => 6);

    my %uniq = map { my $l = $_; ($l => {
        title  => { map { $_ => 1 } @{ $TEXT{$l}{title} } },
        detail => { map { $_ => 1 } @{ $TEXT{$l}{detail} } } }) } qw(en id);
    is(scalar keys %{ $uniq{en}{title} }, 1, 'English title: one text');
    is(scalar keys %{ $uniq{id}{title} }, 1, 'Indonesian title: one text');
    my ($en_t) = keys %{ $uniq{en}{title} };
    my ($id_t) = keys %{ $uniq{id}{title} };
    my ($en_d) = keys %{ $uniq{en}{detail} };
    my ($id_d) = keys %{ $uniq{id}{detail} };
    isnt($id_t, $en_t, 'Indonesian title differs from the English one');
    isnt($id_d, $en_d, 'Indonesian detail differs from the English one');
    like($en_t, qr/consent/i, "English title is English ($en_t)");
    like($id_t, qr/persetujuan|izin/i, "Indonesian title is Indonesian ($id_t)");
}

###########################################################################
# no identity: 401

{
    my $m = consent_metrics();
    for my $case ([ 'no X-Citizen-Id header', undef ],
                  [ 'empty X-Citizen-Id', '' ]) {
        my ($name, $cit) = @$case;
        my $r = req('/health/a', (defined $cit ? (citizen => $cit) : ()));
        is($r->status, 401, "$name: 401") or diag $r->raw;
        like($r->header('Content-Type') // '', qr{^application/problem\+json\b},
            "$name: problem+json");
        is($r->header('X-Consent-Status'), 'MISSING_CITIZEN',
            "$name: \$civicgate_consent_status MISSING_CITIZEN");
        unlike($r->body // '', qr/backend reached/, "$name: backend not reached");
        my $p = json_of($r);
        is($p && $p->{type}, 'urn:civicgate:problem:citizen-required',
            "$name: type");
        is($p && $p->{status}, 401, "$name: status 401");
        ok($p && defined $p->{title} && length $p->{title}
            && defined $p->{detail} && length $p->{detail},
            "$name: title and detail");
    }
    my $en = json_of(req('/research/', lang => 'en'));
    my $id = json_of(req('/research/', lang => 'id-ID'));
    ok($en && $id && $en->{title} ne $id->{title},
        '401 title in Indonesian with Accept-Language id-ID');
    metrics_moved($m, '401 counts no consent check');
}

###########################################################################
# granted: passes and reaches the backend; the grant is cached

{
    grant($C1, 'health');
    # the grant's own invalidation message reaches every worker's
    # subscriber asynchronously: let it arrive before counting HMGETs
    sleep 0.2;
    my $m = consent_metrics();
    my $r = req('/health/x?q=1', citizen => $C1);
    check_pass($r, '/health/', 'granted health');
    is($r->body, "backend reached uri=/echo/health/x?q=1 citizen=$C1\n",
        'granted: the request reached the backend (echo)');
    like($r->header('Content-Type') // '', qr{^text/plain},
        'granted: the backend answer, not a problem');
    $m = metrics_moved($m, 'granted: health granted +1', 'health/granted' => 1);

    # cached: no more HMGET for this citizen's health consent
    my $h0 = hmget_calls();
    for (1 .. 5) {
        $r = req('/health/y', citizen => $C1);
        is($r->status, 200, "granted, repeated $_: 200") if $_ == 5;
    }
    is(hmget_calls() - $h0, 0, 'granted and cached (ttl=60s): no HMGET');
    metrics_moved($m, 'cached decisions are counted too',
        'health/granted' => 5);

    # a location without consent: no check, no status header
    $r = req('/plain/z', citizen => $C1);
    is($r->status, 200, 'location without consent: 200');
    ok(!defined $r->header('X-Consent-Status'),
        'location without consent: $civicgate_consent_status not found '
        . '(no header)') or diag $r->raw;
}

###########################################################################
# two purposes: the first missing one (directive order) is named

{
    my $C2 = new_citizen();
    grant($C2, 'health');
    my $m = consent_metrics();
    my $h0 = hmget_calls();
    my $r = req('/two/p', citizen => $C2);
    check_403($r, 'tax', 'en', 'health granted, tax missing');
    is(hmget_calls() - $h0, 1, 'two uncached purposes: one HMGET');
    $m = metrics_moved($m, 'health granted +1, tax denied +1',
        'health/granted' => 1, 'tax/denied' => 1);

    $r = req('/taxhealth/p', citizen => $C2);
    check_403($r, 'tax', 'en', '"tax health", tax missing');
    $m = metrics_moved($m, '"tax health": tax denied +1', 'tax/denied' => 1);

    my $C3 = new_citizen();
    $r = req('/two/p', citizen => $C3);
    check_403($r, 'health', 'en', '"health tax", both missing: health named');
    $r = req('/taxhealth/p', citizen => $C3);
    check_403($r, 'tax', 'en', '"tax health", both missing: tax named '
        . '(directive order, not the purposes block order)');
    $m = consent_metrics();

    grant($C2, 'tax');
    $r = req('/two/p', citizen => $C2);
    check_pass($r, '/two/', 'both granted');
    is($r->body, "backend reached uri=/echo/two/p citizen=$C2\n",
        'both granted: reached the backend');
    $r = req('/taxhealth/q', citizen => $C2);
    check_pass($r, '/taxhealth/', 'both granted ("tax health")');
    metrics_moved($m, 'both granted twice: health +2, tax +2',
        'health/granted' => 2, 'tax/granted' => 2);

    # inherited from the outer location; "off" disables it
    $r = req('/inherit/on/1', citizen => $C3);
    check_403($r, 'tax', 'en', 'inherited "civicgate_consent tax"');
    $r = req('/inherit/off/1', citizen => $C3);
    is($r->status, 200, '"civicgate_consent off" in a nested location: 200');
    ok(!defined $r->header('X-Consent-Status'),
        '"civicgate_consent off": no check ran');
    $r = req('/inherit/on/1', citizen => $C2);
    check_pass($r, '/inherit/on/', 'inherited, granted');
}

###########################################################################
# withdrawn: 403 at once (the local cache is evicted)

{
    my $r = req('/health/w', citizen => $C1);
    is($r->status, 200, 'before the withdrawal: 200 (cached grant)');
    withdraw($C1, 'health');
    my $m = consent_metrics();
    $r = req('/health/w', citizen => $C1);
    check_403($r, 'health', 'en', 'withdrawn');
    metrics_moved($m, 'withdrawn: health denied +1', 'health/denied' => 1);
    my $rec = $t->redis_query('HGET', "cg:{c:$PS1}:consents", 'health');
    my $d = eval { $JSON->decode($rec // '') };
    is($d && $d->{status}, 'withdrawn', 'the stored record is withdrawn');
}

###########################################################################
# static files behind consent (alias)

{
    my $C4 = new_citizen();
    my $r = req('/research/', citizen => $C4);
    check_403($r, 'research', 'en', 'static location, missing');
    grant($C4, 'research');
    $r = req('/research/other.html', citizen => $C4);
    check_pass($r, '/research/', 'static location, granted');
    is($r->body, "other static page\n", 'static file served');
}

###########################################################################
# expiry: with ttl=60s the cache must not outlive the consent's expiry

sub rfc3339 { strftime('%Y-%m-%dT%H:%M:%SZ', gmtime $_[0]) }

{
    my $C5 = new_citizen();
    my $PS5 = pseudonym($KEY, $C5);

    # the caching check happens late in a second, so that a cache entry
    # that counts the lifetime from the whole second overshoots the expiry
    my $wait_end = time + 1.5;
    sleep 0.01 while time < $wait_end
        && !((time - int time) >= 0.55 && (time - int time) < 0.65);
    my $now = time;
    my $E = int($now) + 3;
    grant($C5, 'research', $JSON->encode({ expires_at => rfc3339($E) }));
    sleep 0.15;    # the grant's invalidation messages arrive first

    my $h0 = hmget_calls();
    my $r = req('/research/', citizen => $C5);
    check_pass($r, '/research/', sprintf('grant expiring in %.2f s', $E - time));
    is($r->body, "static research page\n", 'expiring grant: static index');
    is(hmget_calls() - $h0, 1, 'first check: one HMGET');

    sleep 0.05 while time < $E - 1.0;
    $h0 = hmget_calls();
    $r = req('/research/', citizen => $C5);
    check_pass($r, '/research/', sprintf('%.2f s before the expiry', $E - time));
    is(hmget_calls() - $h0, 0, 'before the expiry: answered from the cache');

    sleep 0.02 while time < $E + 0.25;
    my $m = consent_metrics();
    my $at = time - $E;
    $r = req('/research/', citizen => $C5);
    check_403($r, 'research', 'en',
        sprintf('%.2f s after expires_at (cache ttl=60s)', $at));
    metrics_moved($m, 'expired: research denied +1', 'research/denied' => 1);

    $r = req('/consents/research', citizen => $C5);
    my $e = json_of($r);
    is($e && $e->{status}, 'expired', 'GET /consents/research: expired');
    my $rec = eval { $JSON->decode(
        $t->redis_query('HGET', "cg:{c:$PS5}:consents", 'research') // '') };
    is($rec && $rec->{expires_at}, rfc3339($E), 'stored expires_at');

    # still denied a bit later (from Redis or the negative cache)
    sleep 1.2;
    $r = req('/research/', citizen => $C5);
    is($r->status, 403, 'expired, 1.2 s later: 403');
}

###########################################################################
# a record that is not granted JSON never grants

{
    my $C6 = new_citizen();
    my $key = 'cg:{c:' . pseudonym($KEY, $C6) . '}:consents';
    my @cases = (
        [ 'not JSON', 'granted' ],
        [ 'JSON array', '["granted"]' ],
        [ 'status missing', '{"channel":"web"}' ],
        [ 'status GRANTED (case)', '{"status":"GRANTED"}' ],
        [ 'expires_at unparsable', '{"status":"granted","expires_at":"soon"}' ],
        [ 'expires_at in the past',
          '{"status":"granted","expires_at":"2001-02-03T04:05:06Z"}' ],
    );
    my $i = 0;
    for my $c (@cases) {
        my $purpose = 'tax';
        # a fresh citizen per case: no cached negative decision in the way
        my $cit = new_citizen();
        my $k = 'cg:{c:' . pseudonym($KEY, $cit) . '}:consents';
        $t->redis_query('HSET', $k, $purpose, $c->[1]);
        my $r = req('/inherit/on/r', citizen => $cit);
        is($r->status, 403, "stored record $c->[0]: 403");
    }
    my $cit = new_citizen();
    my $k = 'cg:{c:' . pseudonym($KEY, $cit) . '}:consents';
    $t->redis_query('HSET', $k, 'tax',
        '{"status":"granted","expires_at":null,"channel":"counter"}');
    is(req('/inherit/on/r', citizen => $cit)->status, 200,
        'stored granted record, expires_at null: 200');
    $cit = new_citizen();
    $k = 'cg:{c:' . pseudonym($KEY, $cit) . '}:consents';
    $t->redis_query('HSET', $k, 'tax',
        '{"status":"granted","expires_at":"' . rfc3339(time + 3600) . '"}');
    is(req('/inherit/on/r', citizen => $cit)->status, 200,
        'stored granted record, expires_at in an hour: 200');
}

$t->done_testing;
