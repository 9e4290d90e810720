"""The fetcher's S3 request signing (AWS Signature Version 4), checked against AWS's published example."""

from __future__ import annotations

import datetime

from aqueduct_service.s3 import Credentials, get_object_request, object_url, sign


def test_signature_matches_the_aws_documentation_example() -> None:
    # "Example: GET Object" of the S3 API reference (Signature Version 4, authorization header).
    credentials = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    headers = sign(
        "GET",
        "https://examplebucket.s3.amazonaws.com/test.txt",
        {"Range": "bytes=0-9"},
        credentials,
        "us-east-1",
        datetime.datetime(2013, 5, 24, tzinfo=datetime.timezone.utc),
    )
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_addressing_and_temporary_credentials() -> None:
    assert object_url("b", "dir/a b.pt", "http://minio:9000/", "eu-west-1") == "http://minio:9000/b/dir/a%20b.pt"
    assert object_url("b", "m.pt", None, "eu-west-1") == "https://b.s3.eu-west-1.amazonaws.com/m.pt"
    request = get_object_request(
        "b", "m.pt", endpoint=None, region="eu-west-1", credentials=Credentials("AK", "SK", "TOKEN")
    )
    assert request.get_header("X-amz-security-token") == "TOKEN"
    assert "x-amz-security-token" in request.get_header("Authorization").split("SignedHeaders=")[1]
    anonymous = get_object_request("b", "m.pt", endpoint=None, region="eu-west-1", credentials=None)
    assert not anonymous.has_header("Authorization")
