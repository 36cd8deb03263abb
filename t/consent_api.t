#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The citizen's consent API (/consents/) and the counter's admin endpoints:
# list and entry shapes with labels, grants and withdrawals with signed
# receipts (checked independently here), receipt verification (also after
# a key rotation), and every bad input answered 400/401/404/405/413 with
# problem+json and NOTHING stored.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP ();
use POSIX qw(strftime);
use Time::HiRes qw(time sleep);
use Time::Local qw(timegm);
use Civicgate::Test qw(:all);

my $t = Civicgate::Test->new;
my $JSON = JSON::PP->new->utf8;
my $JRE = journey_id_re();

my $KEY1 = random_key_hex(32);
my $KEY2 = random_key_hex(48);
$t->write_secret_file('keys', [ [ 'k1.old' => $KEY1 ] ]);

$t->write_nginx_conf(<<'EOF');
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;

    civicgate_consent_purposes {
        health   "Layanan kesehatan" "Health services";
        tax      "Perpajakan"        "Taxation";
        research "Penelitian"        "Research";
    }
    civicgate_consent_cache zone=consent:1m ttl=60s;

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;

        civicgate_citizen $http_x_citizen_id;
        civicgate_channel $http_x_channel;
        client_body_buffer_size 1k;
        client_max_body_size 8k;

        location /consents/ {
            civicgate_journey on secure=off;
            civicgate_consent_api;
        }
        location /civicgate/admin/ {
            allow 127.0.0.1;
            deny all;
            civicgate_admin;
        }
        location = /metrics {
            civicgate_metrics;
        }
    }
EOF

$t->run_redis;
$t->run;

my @PURPOSES = qw(health tax research);
my %LABEL = (
    health   => { id => 'Layanan kesehatan', en => 'Health services' },
    tax      => { id => 'Perpajakan', en => 'Taxation' },
    research => { id => 'Penelitian', en => 'Research' },
);
my $TS_RE = qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z$/;

sub rfc3339 { strftime('%Y-%m-%dT%H:%M:%SZ', gmtime $_[0]) }

sub parse_ts {
    my ($s) = @_;
    return undef unless defined $s && $s =~
        /^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.\d+)?(Z|([+-])(\d\d):(\d\d))$/;
    my $t = timegm($6, $5, $4, $3, $2 - 1, $1);
    $t -= ($8 eq '-' ? -1 : 1) * ($9 * 3600 + $10 * 60) if $7 ne 'Z';
    return $t;
}

sub api {
    my ($method, $path, %o) = @_;
    my @h;
    push @h, 'X-Citizen-Id' => $o{citizen} if defined $o{citizen};
    push @h, 'X-Channel' => $o{channel} if defined $o{channel};
    push @h, 'X-Journey-ID' => $o{journey} if defined $o{journey};
    push @h, 'Content-Type' => 'application/json' if defined $o{body};
    return $t->request($path, method => $method, headers => \@h,
        (defined $o{body} ? (body => $o{body}) : ()));
}

sub json_of {
    my ($r) = @_;
    return eval { $JSON->decode($r->body // '') };
}

sub consents_key { 'cg:{c:' . pseudonym($KEY1, $_[0]) . '}:consents' }

sub stored {
    my ($cit) = @_;
    return $t->redis_hash(consents_key($cit));
}

sub check_problem {
    my ($r, $status, $type, $name) = @_;
    is($r->status, $status, "$name: $status") or diag $r->raw;
    like($r->header('Content-Type') // '', qr{^application/problem\+json\b},
        "$name: application/problem+json");
    my $p = json_of($r);
    ok(ref $p eq 'HASH', "$name: JSON object body") or return;
    is($p->{type}, "urn:civicgate:problem:$type", "$name: type $type")
        if defined $type;
    is($p->{status}, $status, "$name: status member $status");
    ok(defined $p->{title} && length $p->{title}, "$name: title");
    return $p;
}

my %RECEIPT_FIELDS = (
    grant => [ qw(receipt_id type purpose citizen granted_at expires_at
                  channel journey key_id alg signature) ],
    withdrawal => [ qw(receipt_id type purpose citizen withdrawn_at
                       channel journey key_id alg signature) ],
);

# checks a receipt; returns it (decoded)
sub check_receipt {
    my ($r, %w) = @_;
    my $name = $w{name};
    my $type = $w{type};
    is($r->status, $type eq 'grant' ? 201 : 200,
        "$name: " . ($type eq 'grant' ? 201 : 200)) or diag $r->raw;
    like($r->header('Content-Type') // '', qr{^application/json\b},
        "$name: application/json");
    my $rc = json_of($r);
    ok(ref $rc eq 'HASH', "$name: JSON object") or return undef;
    my @missing = grep { !exists $rc->{$_} } @{ $RECEIPT_FIELDS{$type} };
    is_deeply(\@missing, [], "$name: has the $type receipt fields")
        or diag explain $rc;
    like($rc->{receipt_id} // '', qr/^[0-9a-fA-F]{16}$/, "$name: receipt_id 16 hex");
    is($rc->{type}, $type, "$name: type $type");
    is($rc->{purpose}, $w{purpose}, "$name: purpose");
    is($rc->{citizen}, pseudonym($KEY1, $w{citizen}),
        "$name: citizen is the pseudonym");
    my $tf = $type eq 'grant' ? 'granted_at' : 'withdrawn_at';
    like($rc->{$tf} // '', $TS_RE, "$name: $tf RFC 3339 UTC");
    my $ts = parse_ts($rc->{$tf});
    ok(defined $ts && abs($ts - time) < 5, "$name: $tf is now")
        or diag $rc->{$tf};
    if ($type eq 'grant') {
        if (defined $w{expires}) {
            like($rc->{expires_at} // '', $TS_RE, "$name: expires_at RFC 3339 UTC");
            is(parse_ts($rc->{expires_at}), $w{expires},
                "$name: expires_at is the requested instant");
        } else {
            ok(exists $rc->{expires_at} && !defined $rc->{expires_at},
                "$name: expires_at null");
        }
    }
    is($rc->{channel}, $w{channel}, "$name: channel $w{channel}");
    if (defined $w{journey}) {
        is($rc->{journey}, $w{journey}, "$name: journey");
    } else {
        ok(exists $rc->{journey} && !defined $rc->{journey}, "$name: journey null");
    }
    is($rc->{key_id}, $w{key_id}, "$name: key_id $w{key_id}");
    is($rc->{alg}, 'HS256', "$name: alg HS256");
    like($rc->{signature} // '', qr/^[A-Za-z0-9_-]{43}$/,
        "$name: signature base64url of 32 bytes");
    is($rc->{signature}, receipt_signature($w{key}, $rc),
        "$name: signature = HMAC-SHA256(receipt subkey, sorted compact JSON)");
    return $rc;
}

sub verify {
    my ($body) = @_;
    my $r = api('POST', '/consents/receipts/verify', body => $body);
    my $d = json_of($r);
    return ($r, $d);
}

sub verify_is {
    my ($receipt, $want, $name) = @_;
    my $body = ref $receipt ? $JSON->encode($receipt) : $receipt;
    my ($r, $d) = verify($body);
    is($r->status, 200, "verify $name: 200") or diag $r->raw;
    like($r->header('Content-Type') // '', qr{^application/json\b},
        "verify $name: application/json");
    ok(ref $d eq 'HASH' && JSON::PP::is_bool($d->{valid})
        && ($d->{valid} ? 1 : 0) == $want,
        "verify $name: {\"valid\":" . ($want ? 'true' : 'false') . '}')
        or diag $r->raw;
}

my $CA = 'CIT-A-' . unpack('H*', random_bytes(4));
my $CB = 'CIT-B-' . unpack('H*', random_bytes(4));

###########################################################################
# GET: list and entry with labels

{
    my $r = api('GET', '/consents/', citizen => $CA);
    is($r->status, 200, 'GET /consents/: 200');
    like($r->header('Content-Type') // '', qr{^application/json\b},
        'GET /consents/: application/json');
    my $d = json_of($r);
    ok(ref $d eq 'HASH' && ref $d->{consents} eq 'ARRAY',
        'GET /consents/: {"consents":[...]}') or diag $r->raw;
    is_deeply($d->{consents}, [ map { { purpose => $_, label => $LABEL{$_},
        status => 'none' } } @PURPOSES ],
        'no consents: every listed purpose, in order, with labels, status none');

    $r = api('GET', '/consents/tax', citizen => $CA);
    is($r->status, 200, 'GET /consents/tax: 200');
    is_deeply(json_of($r), { purpose => 'tax', label => $LABEL{tax},
        status => 'none' }, 'GET /consents/tax: the one entry');

    $r = api('HEAD', '/consents/', citizen => $CA);
    is($r->status, 200, 'HEAD /consents/: 200');
    is($r->body, '', 'HEAD: no body');

    check_problem(api('GET', '/consents/nope', citizen => $CA), 400,
        'unknown-purpose', 'GET unknown purpose');
    check_problem(api('GET', '/consents/', citizen => undef), 401,
        'citizen-required', 'GET /consents/ without identity');
    is_deeply([ $t->redis_scan_keys('cg:{c:*}:consents') ], [], 'GETs store nothing');
}

###########################################################################
# PUT without and with a body: grant receipts

my (@receipts, $R1, $R2, $W1);
{
    my $J = mint_journey_id($KEY1);
    my $r = api('PUT', '/consents/health', citizen => $CA, channel => 'App',
        journey => $J);
    $R1 = check_receipt($r, name => 'PUT without body', type => 'grant',
        purpose => 'health', citizen => $CA, channel => 'app', journey => $J,
        key_id => 'k1.old', key => $KEY1);
    push @receipts, $R1;

    my $rec = stored($CA);
    my $h = eval { $JSON->decode($rec->{health} // '') };
    ok(ref $h eq 'HASH', 'stored record is a JSON object') or diag explain $rec;
    is($h->{status}, 'granted', 'record: status granted');
    is($h->{channel}, 'app', 'record: channel');
    is($h->{journey}, $J, 'record: journey');
    is($h->{granted_at}, $R1->{granted_at}, 'record: granted_at = receipt');
    ok(exists $h->{expires_at} && !defined $h->{expires_at},
        'record: expires_at null');
    is($h->{receipt}, $R1->{receipt_id}, 'record: receipt = receipt_id');
    ok(!exists $h->{notes}, 'record: no notes');
    is_deeply([ sort keys %$rec ], [ 'health' ], 'only health stored');

    # with a body: expires_at with an offset, notes; a minted journey
    my $exp = int(time) + 86400 * 30;
    my $exp_local = strftime('%Y-%m-%dT%H:%M:%S', gmtime($exp + 7 * 3600))
        . '+07:00';
    my $notes = "Setuju untuk riset \x{2014} \"quoted\" / slash";
    $r = api('PUT', '/consents/research', citizen => $CA, channel => 'sms',
        body => $JSON->encode({ expires_at => $exp_local, notes => $notes }));
    my $minted = $r->header('X-Journey-ID');
    like($minted // '', $JRE, 'PUT: a journey was minted');
    $R2 = check_receipt($r, name => 'PUT with expires_at and notes',
        type => 'grant', purpose => 'research', citizen => $CA,
        channel => 'sms', journey => $minted, expires => $exp,
        key_id => 'k1.old', key => $KEY1);
    push @receipts, $R2;
    ok(!exists $R2->{notes}, 'receipt: no notes');
    $h = eval { $JSON->decode(stored($CA)->{research} // '') };
    is($h && $h->{notes}, $notes, 'record: notes stored');
    is($h && parse_ts($h->{expires_at}), $exp, 'record: expires_at');
    is($h && $h->{receipt}, $R2->{receipt_id}, 'record: receipt id');

    # the list and the entry show the records
    my $d = json_of(api('GET', '/consents/', citizen => $CA));
    my %by = map { $_->{purpose} => $_ } @{ $d->{consents} || [] };
    is_deeply([ map { $_->{purpose} } @{ $d->{consents} || [] } ], \@PURPOSES,
        'list: every purpose, in order');
    is($by{health}{status}, 'granted', 'list: health granted');
    is($by{health}{granted_at}, $R1->{granted_at}, 'list: health granted_at');
    is($by{health}{channel}, 'app', 'list: health channel');
    is($by{health}{receipt}, $R1->{receipt_id}, 'list: health receipt');
    is_deeply($by{health}{label}, $LABEL{health}, 'list: health label');
    is($by{research}{status}, 'granted', 'list: research granted');
    is($by{research}{notes}, $notes, 'list: research notes');
    is_deeply($by{tax}, { purpose => 'tax', label => $LABEL{tax},
        status => 'none' }, 'list: tax none');
    my $e = json_of(api('GET', '/consents/research', citizen => $CA));
    is_deeply($e, $by{research}, 'GET /consents/research = its list entry');
}

###########################################################################
# receipt verification

{
    verify_is($R1, 1, 'a grant receipt');
    verify_is($R2, 1, 'a grant receipt with expires_at');
    # canonical form: order of keys and whitespace do not matter
    my $pretty = JSON::PP->new->utf8->pretty->canonical->encode($R1);
    verify_is($pretty, 1, 'the receipt pretty-printed');
    my $enc = JSON::PP->new->utf8->allow_nonref;
    my $rev = "{\n" . join(",\n", map { '  ' . $enc->encode($_) . ' : '
        . $enc->encode($R1->{$_}) } reverse sort keys %$R1) . "\n}";
    verify_is($rev, 1, 'the receipt with keys in reverse order');

    my %x;
    %x = (%$R1, purpose => 'tax');
    verify_is(\%x, 0, 'purpose changed');
    %x = (%$R1, citizen => pseudonym($KEY1, $CB));
    verify_is(\%x, 0, 'citizen changed');
    %x = (%$R1, granted_at => rfc3339(time - 86400));
    verify_is(\%x, 0, 'granted_at changed');
    my $sig = $R1->{signature};
    substr($sig, 10, 1) = substr($sig, 10, 1) eq 'A' ? 'B' : 'A';
    %x = (%$R1, signature => $sig);
    verify_is(\%x, 0, 'one character of the signature changed');
    %x = (%$R1, key_id => 'k9');
    verify_is(\%x, 0, 'unknown key_id');
    %x = (%$R1, extra => 'x');
    verify_is(\%x, 0, 'a field added');
    %x = %$R1;
    delete $x{journey};
    verify_is(\%x, 0, 'a field removed');
    # signed with the right algorithm but another key
    %x = %$R1;
    $x{signature} = receipt_signature(random_key_hex(32), \%x);
    verify_is(\%x, 0, 'signed under a key not in the file');

    # verification needs no identity, and stores nothing
    my $before = $t->redis_hash(consents_key($CA));
    my ($r) = verify($JSON->encode($R1));
    is($r->status, 200, 'verify without X-Citizen-Id: 200');
    is_deeply($t->redis_hash(consents_key($CA)), $before,
        'verify stores nothing');
}

###########################################################################
# DELETE: withdrawal receipt

{
    my $r = api('DELETE', '/consents/health', citizen => $CA, channel => 'web');
    my $J = $r->header('X-Journey-ID');
    $W1 = check_receipt($r, name => 'DELETE', type => 'withdrawal',
        purpose => 'health', citizen => $CA, channel => 'web', journey => $J,
        key_id => 'k1.old', key => $KEY1);
    push @receipts, $W1;
    verify_is($W1, 1, 'a withdrawal receipt');
    my %x = (%$W1, type => 'grant');
    verify_is(\%x, 0, 'a withdrawal receipt turned into a grant');

    my $h = eval { $JSON->decode(stored($CA)->{health} // '') };
    is($h && $h->{status}, 'withdrawn', 'record: withdrawn');
    is($h && $h->{withdrawn_at}, $W1->{withdrawn_at}, 'record: withdrawn_at');
    is($h && $h->{receipt}, $W1->{receipt_id}, 'record: the withdrawal receipt');
    is($h && $h->{channel}, 'web', 'record: channel');
    my $e = json_of(api('GET', '/consents/health', citizen => $CA));
    is($e->{status}, 'withdrawn', 'GET: withdrawn');
    is($e->{withdrawn_at}, $W1->{withdrawn_at}, 'GET: withdrawn_at');
}

###########################################################################
# bad input: 400 / 401 / 405 / 413, problem+json, nothing stored

# the grant that must stay as it is
api('PUT', '/consents/tax', citizen => $CB, channel => 'web');
my $SNAP = stored($CB);
ok(exists $SNAP->{tax}, 'citizen B: tax granted (the state to keep)');
my $SNAP_A = stored($CA);

sub unchanged {
    my ($name) = @_;
    is_deeply(stored($CB), $SNAP, "$name: nothing stored")
        or diag explain stored($CB);
}

{
    my @bodies = (
        [ 'malformed JSON', '{"notes":' ],
        [ 'trailing comma', '{"notes":"a",}' ],
        [ 'a JSON array', '[]' ],
        [ 'a JSON array of an object', '[{"notes":"a"}]' ],
        [ 'a JSON string', '"granted"' ],
        [ 'JSON null', 'null' ],
        [ 'a JSON number', '42' ],
        [ 'duplicate keys', '{"notes":"a","notes":"b"}' ],
        [ 'unknown field', '{"foo":1}' ],
        [ 'unknown field status', '{"status":"withdrawn"}' ],
        [ 'unknown field citizen', '{"citizen":"someone-else"}' ],
        [ 'unknown field granted_at', '{"granted_at":"2030-01-01T00:00:00Z"}' ],
        [ 'unknown field next to a valid one',
          '{"notes":"ok","expires":"2030-01-01T00:00:00Z"}' ],
        [ 'expires_at unparsable', '{"expires_at":"tomorrow"}' ],
        [ 'expires_at without zone', '{"expires_at":"2031-01-01T00:00:00"}' ],
        [ 'expires_at month 13', '{"expires_at":"2031-13-01T00:00:00Z"}' ],
        [ 'expires_at a number', '{"expires_at":1924992000}' ],
        [ 'expires_at in the past', '{"expires_at":"2020-01-01T00:00:00Z"}' ],
        [ 'expires_at a minute ago',
          '{"expires_at":"' . rfc3339(time - 60) . '"}' ],
        [ 'notes of 501 bytes', $JSON->encode({ notes => 'n' x 501 }) ],
        [ 'notes of 502 bytes (251 two-byte characters)',
          $JSON->encode({ notes => "\x{e9}" x 251 }) ],
        [ 'notes not a string', '{"notes":["a"]}' ],
    );
    for my $b (@bodies) {
        my $r = api('PUT', '/consents/tax', citizen => $CB, channel => 'sms',
            body => $b->[1]);
        check_problem($r, 400, 'invalid-body', "PUT body: $b->[0]");
        unchanged("PUT body: $b->[0]");
    }
    # the same checks for a withdrawal body
    for my $b ([ 'malformed JSON', '{' ], [ 'unknown field', '{"foo":1}' ],
               [ 'a JSON array', '[]' ]) {
        my $r = api('DELETE', '/consents/tax', citizen => $CB, body => $b->[1]);
        check_problem($r, 400, 'invalid-body', "DELETE body: $b->[0]");
        unchanged("DELETE body: $b->[0]");
    }

    for my $m ([ 'PUT', '/consents/nope' ], [ 'DELETE', '/consents/nope' ],
               [ 'PUT', '/consents/Tax' ], [ 'PUT', '/consents/tax/' ],
               [ 'PUT', '/consents/taxes' ]) {
        my $r = api($m->[0], $m->[1], citizen => $CB, body => '{}');
        check_problem($r, 400, 'unknown-purpose', "$m->[0] $m->[1]");
        unchanged("$m->[0] $m->[1]");
    }

    for my $m ([ 'POST', '/consents/tax', 'GET, HEAD, PUT, DELETE' ],
               [ 'PATCH', '/consents/tax', 'GET, HEAD, PUT, DELETE' ],
               [ 'PUT', '/consents/', 'GET, HEAD' ],
               [ 'POST', '/consents/', 'GET, HEAD' ],
               [ 'DELETE', '/consents/', 'GET, HEAD' ],
               [ 'GET', '/consents/receipts/verify', 'POST' ],
               [ 'PUT', '/consents/receipts/verify', 'POST' ]) {
        my $r = api($m->[0], $m->[1], citizen => $CB, body => '{}');
        check_problem($r, 405, undef, "$m->[0] $m->[1]");
        is($r->header('Allow'), $m->[2], "$m->[0] $m->[1]: Allow: $m->[2]");
        unchanged("$m->[0] $m->[1]");
    }

    # no identity
    for my $m ([ 'PUT', '/consents/tax' ], [ 'DELETE', '/consents/tax' ]) {
        my $r = api($m->[0], $m->[1], body => '{}');
        check_problem($r, 401, 'citizen-required', "$m->[0] without identity");
    }
    is_deeply([ $t->redis_scan_keys('cg:{c:*}:consents') ],
        [ sort(consents_key($CA), consents_key($CB)) ],
        'requests without identity stored nothing');

    # bodies too large: client_body_buffer_size 1k, client_max_body_size 8k
    my $big = '{"notes":"x"' . (' ' x 4000) . '}';
    is(length $big, 4013, 'a 4 KB valid JSON object');
    my $r = api('PUT', '/consents/tax', citizen => $CB, body => $big);
    check_problem($r, 413, 'body-too-large',
        '4 KB body (client_body_buffer_size 1k)');
    unchanged('4 KB body');
    $r = api('POST', '/consents/receipts/verify',
        body => $JSON->encode($R1) . (' ' x 4000));
    check_problem($r, 413, 'body-too-large', '4 KB verify body');
    my $huge = '{"notes":"x"' . (' ' x 16000) . '}';
    $r = api('PUT', '/consents/tax', citizen => $CB, body => $huge);
    is($r->status, 413, '16 KB body (beyond client_max_body_size 8k): 413');
    unchanged('16 KB body');

    # boundaries that pass: notes of exactly 500 bytes (also multibyte)
    $r = api('PUT', '/consents/research', citizen => $CB,
        body => $JSON->encode({ notes => 'n' x 500 }));
    is($r->status, 201, 'notes of 500 bytes: 201');
    $r = api('PUT', '/consents/health', citizen => $CB,
        body => $JSON->encode({ notes => "\x{e9}" x 250 }));
    is($r->status, 201, 'notes of 500 bytes (250 two-byte characters): 201');
    my $h = eval { $JSON->decode(stored($CB)->{health} // '') };
    is($h && $h->{notes}, "\x{e9}" x 250, 'multibyte notes stored as sent');
    $r = api('PUT', '/consents/health', citizen => $CB, body => '');
    is($r->status, 201, 'PUT with an empty body (Content-Length: 0): 201');
    $r = api('PUT', '/consents/health', citizen => $CB, body => '{}');
    is($r->status, 201, 'PUT with {}: 201');
    is_deeply(stored($CA), $SNAP_A, "citizen A's consents untouched");
}

###########################################################################
# admin: grant and withdraw by raw identifier, channel "counter"

my ($AR, $AW);
{
    my $RAW = 'NIK-3174-ADMIN-' . unpack('H*', random_bytes(4));
    my $exp = int(time) + 3600;
    my $SNAP_B = stored($CB);
    # the request's own identity headers are not the citizen
    my $r = $t->request('/civicgate/admin/consents/health', method => 'PUT',
        headers => [ 'X-Citizen-Id' => $CB, 'X-Channel' => 'web',
            'Content-Type' => 'application/json' ],
        body => $JSON->encode({ citizen => $RAW, expires_at => rfc3339($exp),
            notes => 'form 12 signed at the counter' }));
    $AR = check_receipt($r, name => 'admin PUT', type => 'grant',
        purpose => 'health', citizen => $RAW, channel => 'counter',
        journey => undef, expires => $exp, key_id => 'k1.old', key => $KEY1);
    push @receipts, $AR;
    verify_is($AR, 1, 'an admin grant receipt');
    my $h = eval { $JSON->decode(stored($RAW)->{health} // '') };
    is($h && $h->{status}, 'granted', 'admin grant stored under the pseudonym');
    is($h && $h->{channel}, 'counter', 'admin grant: channel counter');
    is($h && $h->{notes}, 'form 12 signed at the counter', 'admin grant: notes');
    ok(!grep({ index($_, $RAW) >= 0 } %{ stored($RAW) }),
        'the raw identifier is not in the record');
    is_deeply(stored($CB), $SNAP_B,
        'nothing stored for the identity in the request headers');

    $r = $t->request('/civicgate/admin/consents/health', method => 'DELETE',
        headers => [ 'Content-Type' => 'application/json' ],
        body => $JSON->encode({ citizen => $RAW }));
    $AW = check_receipt($r, name => 'admin DELETE', type => 'withdrawal',
        purpose => 'health', citizen => $RAW, channel => 'counter',
        journey => undef, key_id => 'k1.old', key => $KEY1);
    push @receipts, $AW;
    verify_is($AW, 1, 'an admin withdrawal receipt');
    $h = eval { $JSON->decode(stored($RAW)->{health} // '') };
    is($h && $h->{status}, 'withdrawn', 'admin withdrawal stored');
    is($h && $h->{channel}, 'counter', 'admin withdrawal: channel counter');

    my $SNAP_R = stored($RAW);
    my @keys0 = $t->redis_scan_keys('cg:{c:*}:consents');
    for my $b ([ 'no body', undef ], [ 'empty object', '{}' ],
               [ 'citizen empty', '{"citizen":""}' ],
               [ 'citizen a number', '{"citizen":12345}' ],
               [ 'citizen null', '{"citizen":null}' ],
               [ 'malformed JSON', '{"citizen":' ],
               [ 'a JSON array', '["' . $RAW . '"]' ],
               [ 'unknown field', $JSON->encode({ citizen => $RAW, x => 1 }) ],
               [ 'expires_at in the past', $JSON->encode({ citizen => $RAW,
                   expires_at => '2020-01-01T00:00:00Z' }) ],
               [ 'notes of 501 bytes', $JSON->encode({ citizen => $RAW,
                   notes => 'n' x 501 }) ]) {
        my $r = $t->request('/civicgate/admin/consents/health', method => 'PUT',
            headers => [ 'Content-Type' => 'application/json' ],
            (defined $b->[1] ? (body => $b->[1]) : ()));
        check_problem($r, 400, 'invalid-body', "admin PUT, $b->[0]");
        is_deeply(stored($RAW), $SNAP_R, "admin PUT, $b->[0]: nothing stored");
    }
    is_deeply([ $t->redis_scan_keys('cg:{c:*}:consents') ], \@keys0,
        'bad admin requests created no key');

    for my $p ('/civicgate/admin/', '/civicgate/admin/foo',
               '/civicgate/admin/consents/', '/civicgate/admin/consent/health',
               '/civicgate/admin/receipts/verify') {
        my $r = $t->request($p, method => 'PUT',
            body => $JSON->encode({ citizen => $RAW }));
        check_problem($r, 404, undef, "admin PUT $p");
    }
    my $r2 = $t->request('/civicgate/admin/consents/nope', method => 'PUT',
        body => $JSON->encode({ citizen => $RAW }));
    check_problem($r2, 400, 'unknown-purpose', 'admin PUT unknown purpose');
    for my $m (qw(GET POST PATCH)) {
        my $r = $t->request('/civicgate/admin/consents/health', method => $m,
            body => $JSON->encode({ citizen => $RAW }));
        check_problem($r, 405, undef, "admin $m");
        is($r->header('Allow'), 'PUT, DELETE', "admin $m: Allow: PUT, DELETE");
    }
    is_deeply(stored($RAW), $SNAP_R, 'admin errors: nothing stored');
}

###########################################################################
# key rotation: a new key PREPENDED, reload: old receipts still verify,
# new ones are signed with the new key, pseudonyms unchanged

{
    $t->write_secret_file('keys', [ [ 'k2-new' => $KEY2 ], [ 'k1.old' => $KEY1 ] ]);
    ok($t->reload, 'reload with a new key prepended');
    for my $i (0 .. $#receipts) {
        verify_is($receipts[$i], 1, "after the rotation, old receipt $i "
            . "($receipts[$i]{type}, key_id $receipts[$i]{key_id})");
    }
    my %x = (%$R1, purpose => 'tax');
    verify_is(\%x, 0, 'after the rotation, a tampered old receipt');
    %x = (%$R1, key_id => 'k2-new');
    verify_is(\%x, 0, 'an old receipt relabelled with the new key_id');

    my $r = api('PUT', '/consents/tax', citizen => $CA, channel => 'web');
    my $J = $r->header('X-Journey-ID');
    my $N = check_receipt($r, name => 'PUT after the rotation', type => 'grant',
        purpose => 'tax', citizen => $CA, channel => 'web', journey => $J,
        key_id => 'k2-new', key => $KEY2);
    verify_is($N, 1, 'a receipt signed with the new key');
    ok(exists stored($CA)->{tax}, 'the same pseudonym: stored with the others');
}

$t->done_testing;
