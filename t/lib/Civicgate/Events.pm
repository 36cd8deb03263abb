package Civicgate::Events;

# Copyright (c) civicgate authors
# SPDX-License-Identifier: BSD-2-Clause

=head1 NAME

Civicgate::Events - where the gateway puts a journey's events

=head1 SYNOPSIS

    use Civicgate::Events qw(crc32 event_shard event_stream);

    my $n = event_shard($journey);       # 0 .. 15
    my $n = event_shard($journey, 2);    # civicgate_event_shards 2
    $t->redis_stream(event_stream($n));  # cg:{events:N}

=head1 FUNCTIONS (exported on request, all with :all)

    crc32($bytes)             CRC-32 (IEEE 802.3, the gateway's
                              ngx_crc32_short), computed independently
                              in pure Perl
    event_shard($journey [, $shards])
                              the shard of a journey's events: its CRC-32
                              mod $shards (default 16, the default number
                              of shards)
    event_stream($n)          the key of shard $n's stream, cg:{events:N}

=cut

use strict;
use warnings;

use Exporter qw(import);

our @EXPORT_OK = qw(crc32 event_shard event_stream);
our %EXPORT_TAGS = (all => \@EXPORT_OK);

my $SHARDS = 16;

# table-driven, reflected polynomial 0xEDB88320
my @CRC = map {
    my $c = $_;
    $c = ($c & 1) ? (0xEDB88320 ^ ($c >> 1)) : ($c >> 1) for 1 .. 8;
    $c;
} 0 .. 255;

sub crc32 {
    my $c = 0xFFFFFFFF;
    $c = $CRC[($c ^ $_) & 0xFF] ^ ($c >> 8) for unpack 'C*', $_[0];
    return $c ^ 0xFFFFFFFF;
}

sub event_shard {
    my ($journey, $shards) = @_;
    return crc32($journey) % ($shards // $SHARDS);
}

sub event_stream { "cg:{events:$_[0]}" }

1;
