#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# civicgate_signing_key: "nginx -t" refuses, with a clear message, a key
# that is missing, unreadable, readable by every user, not PEM, not
# Ed25519, the same key twice, a bad or duplicate kid, and civicgate_jwks
# without a key.  Rotation: a new first key signs new receipts while the
# receipts of the old one still verify, and both are published.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use Test::More;
use JSON::PP ();
use Civicgate::Test qw(:all);
use Civicgate::Sign qw(:all);

my $t = Civicgate::Test->new;
my $JSON = JSON::PP->new->utf8;

$t->write_secret_file('keys', [ [ k1 => random_key_hex(32) ] ]);

my $OLD = ed25519_key($t, 'old.pem');
my $NEW = ed25519_key($t, 'new.pem');

sub conf {
    my ($keys) = @_;
    return $t->nginx_conf(<<"EOF");
    civicgate_secret_file %%TESTDIR%%/keys;
    civicgate_redis redis://127.0.0.1:%%REDIS_PORT%%;
$keys
    civicgate_consent_purposes {
        tax "Perpajakan" "Taxation";
    }

    server {
        listen 127.0.0.1:%%PORT_0%%;
        server_name localhost;
        civicgate_citizen \$http_x_citizen_id;

        location /consents/ {
            civicgate_consent_api;
        }
        location = /.well-known/jwks.json {
            civicgate_jwks;
        }
    }
EOF
}

sub refused {
    my ($keys, $re, $name) = @_;
    $t->write_file_expand('bad.conf', conf($keys));
    my ($rc, $out) = $t->test_config(conf => 'bad.conf');
    isnt($rc, 0, "$name: nginx -t fails");
    like($out, $re, "$name: says why") or diag $out;
}

###########################################################################
# nginx -t

{
    refused("    civicgate_signing_key %%TESTDIR%%/none.pem;",
        qr/emerg.*none\.pem.*(No such file|failed)/, 'missing key');

    mkdir $t->testdir . '/dir.pem', 0700;
    refused("    civicgate_signing_key %%TESTDIR%%/dir.pem;",
        qr/emerg.*dir\.pem.*not a regular file/, 'a directory');

  SKIP: {
        skip 'root reads a file of mode 000', 2 if $> == 0;
        my $p = ed25519_key($t, 'unreadable.pem', 0000);
        refused("    civicgate_signing_key $p;",
            qr/emerg.*unreadable\.pem.*Permission denied/, 'unreadable key');
    }

    my $wr = ed25519_key($t, 'world.pem', 0644);
    refused("    civicgate_signing_key $wr;",
        qr/emerg.*signing key ".*world\.pem" is accessible to every user \(mode 644\)/,
        'mode 644');

    my $rsa = $t->testdir . '/rsa.pem';
    system("openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:1024"
        . " -out '$rsa' 2>/dev/null") == 0 or die 'openssl';
    chmod 0600, $rsa;
    refused("    civicgate_signing_key $rsa;",
        qr/emerg.*rsa\.pem" is not an Ed25519 key/, 'RSA key');

    my $pub = $t->testdir . '/pub.pem';
    system("openssl pkey -in '$OLD' -pubout -out '$pub'") == 0 or die;
    chmod 0600, $pub;
    refused("    civicgate_signing_key $pub;",
        qr/emerg.*pub\.pem" is not a PEM private key/, 'a public key');

    refused("    civicgate_signing_key $OLD;\n    civicgate_signing_key $OLD;",
        qr/emerg.*is the same key as/, 'the same key twice');
    refused("    civicgate_signing_key $OLD kid=a;\n"
        . "    civicgate_signing_key $NEW kid=a;",
        qr/emerg.*duplicate signing key id "a"/, 'duplicate kid');
    refused("    civicgate_signing_key $OLD kid=a/b;",
        qr/emerg.*invalid "kid=a\/b"/, 'invalid kid');
    refused("    civicgate_signing_key $OLD kid=;",
        qr/emerg.*invalid "kid="/, 'empty kid');
    refused("    civicgate_signing_key $OLD foo=1;",
        qr/emerg.*invalid parameter "foo=1"/, 'unknown parameter');
    refused('', qr/emerg.*"civicgate_jwks" requires "civicgate_signing_key"/,
        'civicgate_jwks without a key');

    $t->write_file_expand('good.conf',
        conf("    civicgate_signing_key $OLD;\n"
            . "    civicgate_signing_key $NEW kid=2027-01;"));
    my ($rc, $out) = $t->test_config(conf => 'good.conf');
    is($rc, 0, 'two keys, one with a kid: nginx -t passes') or diag $out;
}

###########################################################################
# rotation

sub jwks {
    my $r = $t->request('/.well-known/jwks.json');
    return eval { $JSON->decode($r->body) };
}

sub grant {
    my ($citizen) = @_;
    my $r = $t->request('/consents/tax', method => 'PUT',
        headers => [ 'X-Citizen-Id' => $citizen ]);
    is($r->status, 201, "grant for $citizen: 201") or diag $r->raw;
    return eval { $JSON->decode($r->body) };
}

sub verify {
    my ($receipt) = @_;
    my $r = $t->request('/consents/receipts/verify', method => 'POST',
        headers => [ 'Content-Type' => 'application/json' ],
        body => $JSON->encode($receipt));
    my $d = eval { $JSON->decode($r->body) } // {};
    return $d->{valid} ? 1 : 0;
}

# verified as a stranger does: the key of its kid from the JWK Set
sub verify_offline {
    my ($set, $receipt) = @_;
    my ($jwk) = grep { $_->{kid} eq $receipt->{key_id} } @{ $set->{keys} };
    return 0 unless $jwk;
    my %body = %$receipt;
    my $sig = b64url_decode(delete $body{signature});
    return openssl_verify($t, jwk_pem($jwk->{x}), canonical(\%body), $sig);
}

{
    $t->write_file_expand('nginx.conf',
        conf("    civicgate_signing_key $OLD;"));
    $t->run_redis;
    $t->run;

    my $set1 = jwks();
    is(scalar @{ $set1->{keys} // [] }, 1, 'one key published');
    my $kid_old = $set1->{keys}[0]{kid};
    like($kid_old, qr/^[A-Za-z0-9_-]{11}$/,
        'default kid: 11 base64url characters');

    my $raw = qx{openssl pkey -in '$OLD' -pubout -outform DER};
    my $x = substr($raw, -32);
    require Digest::SHA;
    my $want = MIME::Base64::encode_base64(substr(Digest::SHA::sha256($x), 0, 8), '');
    $want =~ tr{+/}{-_};
    $want =~ s/=+$//;
    is($kid_old, $want, 'default kid: base64url of SHA-256(public key)[0..8]');

    my $r1 = grant('CIT-ROT-1');
    is($r1->{alg}, 'EdDSA', 'old key: EdDSA receipt');
    is($r1->{key_id}, $kid_old, 'old key: key_id is its kid');
    ok(verify($r1), 'old key: its receipt verifies');

    $t->write_file_expand('nginx.conf',
        conf("    civicgate_signing_key $NEW kid=2027-01;\n"
            . "    civicgate_signing_key $OLD;"));
    ok($t->reload, 'reload with a new first key');

    my $set2 = jwks();
    is_deeply([ map { $_->{kid} } @{ $set2->{keys} } ], [ '2027-01', $kid_old ],
        'both keys published, the new one first');

    my $r2 = grant('CIT-ROT-2');
    is($r2->{key_id}, '2027-01', 'new receipts: signed by the new key');
    ok(verify($r2), 'new receipt verifies');
    ok(verify($r1), 'receipt of the old key still verifies');
    ok(verify_offline($set2, $r1), 'old receipt verifies offline (openssl)');
    ok(verify_offline($set2, $r2), 'new receipt verifies offline (openssl)');

    my %forged = (%$r1, key_id => '2027-01');
    ok(!verify(\%forged), 'old signature under the new kid: invalid');

    $t->write_file_expand('nginx.conf',
        conf("    civicgate_signing_key $NEW kid=2027-01;"));
    ok($t->reload, 'reload without the old key');
    ok(!verify($r1), 'old key withdrawn: its receipts no longer verify');
    ok(verify($r2), 'the new one does');
}

$t->done_testing;
