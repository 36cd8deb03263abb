package Civicgate::Sign;

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# What a verifier outside the gateway does with its signatures, with
# nothing but the JWK Set: Ed25519 keys made by openssl, a JWK's "x" as a
# PEM public key, verification by "openssl pkeyutl -verify -rawin" and by
# Python's "cryptography" package, compact JWS taken apart.

use strict;
use warnings;

use Exporter 'import';
use JSON::PP ();
use MIME::Base64 qw(decode_base64 encode_base64);

our @EXPORT_OK = qw(ed25519_key b64url_decode canonical jwk_pem
    openssl_verify python_verify jws_parse notice_code_of);
our %EXPORT_TAGS = (all => \@EXPORT_OK);

my $JSON = JSON::PP->new->utf8->canonical;

# a new private key in PEM (openssl genpkey), mode 0600 unless given
sub ed25519_key {
    my ($t, $name, $mode) = @_;
    my $path = $t->testdir . "/$name";
    system('openssl', 'genpkey', '-algorithm', 'ed25519', '-out', $path) == 0
        or die "openssl genpkey failed";
    chmod($mode // 0600, $path);
    return $path;
}

sub b64url_decode {
    my ($s) = @_;
    $s =~ tr{-_}{+/};
    $s .= '=' x ((4 - length($s) % 4) % 4);
    return decode_base64($s);
}

# the form receipts are signed in: sorted keys, compact, UTF-8
sub canonical {
    my ($data) = @_;
    return $JSON->encode($data);
}

# RFC 8410 SubjectPublicKeyInfo of a raw Ed25519 key: a fixed 12-byte
# prefix (SEQUENCE, the id-Ed25519 OID 1.3.101.112, BIT STRING) and x
sub jwk_pem {
    my ($x) = @_;
    my $der = pack('H*', '302a300506032b6570032100') . b64url_decode($x);
    return "-----BEGIN PUBLIC KEY-----\n" . encode_base64($der)
        . "-----END PUBLIC KEY-----\n";
}

# openssl pkeyutl -verify -pubin -inkey pub.pem -rawin -in msg -sigfile sig
sub openssl_verify {
    my ($t, $pem, $msg, $sig) = @_;
    my $pub = $t->write_file('verify-pub.pem', $pem);
    my $in = $t->write_file('verify-msg', $msg);
    my $sf = $t->write_file('verify-sig', $sig);
    my $out = qx{openssl pkeyutl -verify -pubin -inkey '$pub' -rawin -in '$in' -sigfile '$sf' 2>&1};
    return ($? == 0 && $out =~ /Signature Verified Successfully/) ? 1 : 0;
}

# the same with python3-cryptography: Ed25519PublicKey.verify()
sub python_verify {
    my ($t, $x, $msg, $sig) = @_;
    my $in = $t->write_file('verify-msg', $msg);
    my $sf = $t->write_file('verify-sig', $sig);
    my $py = <<'EOF';
import base64, sys
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
x = sys.argv[1]
key = Ed25519PublicKey.from_public_bytes(
    base64.urlsafe_b64decode(x + "=" * (-len(x) % 4)))
try:
    key.verify(open(sys.argv[3], "rb").read(), open(sys.argv[2], "rb").read())
    print("valid")
except InvalidSignature:
    print("invalid")
EOF
    my $script = $t->write_file('verify.py', $py);
    my $out = qx{python3 '$script' '$x' '$in' '$sf' 2>&1};
    chomp $out;
    return $out eq 'valid' ? 1 : $out eq 'invalid' ? 0 : "error: $out";
}

# a compact JWS: (header, payload bytes, signing input, signature bytes)
sub jws_parse {
    my ($jws) = @_;
    my ($h, $p, $s) = split /\./, $jws // '', -1;
    return () unless defined $s;
    return (eval { $JSON->decode(b64url_decode($h)) }, b64url_decode($p),
        "$h.$p", b64url_decode($s));
}

# what a notice code is: the first 50 bits of its JWS signature, Crockford
sub notice_code_of {
    my ($sig) = @_;
    my @a = split //, '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
    my $bits = unpack('B*', $sig);
    my $c = join '', map { $a[oct('0b' . substr($bits, $_ * 5, 5))] } 0 .. 9;
    return substr($c, 0, 5) . '-' . substr($c, 5);
}

1;
