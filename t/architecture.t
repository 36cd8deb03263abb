#!/usr/bin/perl

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

# The layering of module/ stays as docs/architecture.md describes it: the
# core includes and calls nothing of a concern; a concern includes and
# calls another only through that concern's narrow header; no file
# calls, directly or through others, a file that calls back into it; and
# only the compat header deals with nginx versions.
# Every file of module/ belongs to a layer here, so a new one is placed.
# Reads the sources only: no nginx, no Redis.

use strict;
use warnings;

use FindBin;
use File::Basename qw(basename);
use Test::More;

my $DIR = $ENV{CIVICGATE_MODULE_DIR} || "$FindBin::Bin/../module";

# file stem (after ngx_http_civicgate_) => layer
my %LAYER = (
    (map { $_ => 'core' } qw(util crypto codec json table gcra redis
        redis_sentinel redis_cluster metrics conf core admin module compat
        sign)),
    journey => 'journey',
    events => 'events',
    limit => 'limit',
    consent => 'consent', consent_api => 'consent', consent_uses => 'consent',
    status => 'status', stream => 'status', status_journey => 'status',
    status_admin => 'status', notice => 'status', status_page => 'status',
    health => 'health',
    metrics_module => 'metrics',
);

# the narrow headers through which a concern may be used by another
my %NARROW = (
    journey => 'ngx_http_civicgate_journey.h',
    events => 'ngx_http_civicgate_events.h',
);

sub stem {
    my ($f) = @_;
    (my $s = basename($f)) =~ s/^ngx_http_civicgate_//;
    $s =~ s/\.[ch]$//;
    return $s;
}

sub strip {
    my ($text) = @_;
    $text =~ s{/\*.*?\*/}{ }gs;
    $text =~ s{"(?:\\.|[^"\\\n])*"}{""}g;
    return $text;
}

opendir(my $dh, $DIR) or die "$DIR: $!";
my @files = sort map { "$DIR/$_" } grep { /^ngx_http_civicgate_\w+\.[ch]$/ }
    readdir $dh;
closedir $dh;

ok(@files > 10, 'module sources found') or BAIL_OUT("no sources in $DIR");

my (%src, %raw);
for my $f (@files) {
    open(my $fh, '<', $f) or die "$f: $!";
    local $/;
    $raw{$f} = <$fh>;
    $src{$f} = strip($raw{$f});
    close $fh;
}

# every file has a layer

my @unplaced = grep { !exists $LAYER{stem($_)} } @files;
is_deeply([ map { basename($_) } @unplaced ], [],
    'every file of module/ belongs to a layer');

# includes

my @bad_includes;
for my $f (@files) {
    my $from = $LAYER{stem($f)} // next;
    for my $inc ($raw{$f} =~ /^#include\s+"(ngx_http_civicgate_\w+\.h)"/mg) {
        my $to = $LAYER{stem($inc)} // 'unknown';
        next if $to eq 'core' || $to eq $from;
        next if $from ne 'core' && $f =~ /\.c$/
            && defined $NARROW{$to} && $NARROW{$to} eq $inc;
        push @bad_includes, basename($f) . " ($from) includes $inc ($to)";
    }
}
is_deeply(\@bad_includes, [], 'the core includes no concern; a concern'
    . ' includes another only through its narrow header')
    or diag join "\n", @bad_includes;

# functions: where each is defined, and what each file refers to

my (%defined_in, %declared_in);
for my $f (@files) {
    if ($f =~ /\.c$/) {
        while ($src{$f} =~ /^[a-z_][\w \*]*\n(ngx_http_civicgate_\w+)\(/mg) {
            $defined_in{$1} //= $f;
        }
    } else {
        $declared_in{$1}{basename($f)} = 1
            while $src{$f} =~ /\b(ngx_http_civicgate_\w+)\(/g;
    }
}

my (%calls, @bad_calls);
for my $f (grep { /\.c$/ } @files) {
    my $from = $LAYER{stem($f)} // next;
    my %seen;
    for my $name ($src{$f} =~ /\b(ngx_http_civicgate_\w+)\b/g) {
        next if $seen{$name}++;
        my $g = $defined_in{$name} // next;
        next if $g eq $f;
        $calls{$f}{$g} = 1;
        my $to = $LAYER{stem($g)} // "unknown";
        next if $to eq 'core' || $to eq $from;
        next if $from ne 'core' && defined $NARROW{$to}
            && $declared_in{$name}{$NARROW{$to}};
        push @bad_calls, basename($f) . " ($from) uses $name of "
            . basename($g) . " ($to)";
    }
}
is_deeply(\@bad_calls, [], 'the core calls no concern; a concern calls'
    . ' another only through its narrow header')
    or diag join "\n", @bad_calls;

# no file reaches, through calls, a file that calls back into it

my (%index, %low, %on, @stack, @cycles);
my $n = 0;

sub visit {
    my ($v) = @_;
    $index{$v} = $low{$v} = $n++;
    push @stack, $v;
    $on{$v} = 1;
    for my $w (sort keys %{ $calls{$v} || {} }) {
        if (!exists $index{$w}) {
            visit($w);
            $low{$v} = $low{$w} if $low{$w} < $low{$v};
        } elsif ($on{$w}) {
            $low{$v} = $index{$w} if $index{$w} < $low{$v};
        }
    }
    return if $low{$v} != $index{$v};
    my @comp;
    while (1) {
        my $w = pop @stack;
        delete $on{$w};
        push @comp, basename($w);
        last if $w eq $v;
    }
    push @cycles, join(' <-> ', sort @comp) if @comp > 1;
}

visit($_) for grep { !exists $index{$_} } grep { /\.c$/ } @files;

is_deeply(\@cycles, [], 'no file calls a file that calls back into it')
    or diag join "\n", @cycles;

# the differences between nginx versions stay in the compat header: no
# other file checks nginx_version, or pushes a header list's element
# without it (nginx 1.23+ chains headers through an unset next pointer)

my @compat;
for my $f (grep { stem($_) ne 'compat' } @files) {
    push @compat, basename($f) . ': nginx_version'
        if $src{$f} =~ /\bnginx_version\b/;
    push @compat, basename($f) . ': ngx_list_push() of headers'
        if $src{$f} =~ /\bngx_list_push\s*\(\s*&\s*r->headers_(?:in|out)\b/;
}
is_deeply(\@compat, [], 'only the compat header deals with nginx versions')
    or diag join "\n", @compat;

done_testing;
