#!/usr/bin/env bash
# The instance profiles cluster.yaml's nodes run under; once per AWS account, before the first `ray up`.
# Safe to run again (it creates only what is missing). Needs the AWS CLI and IAM rights on your machine.
#
#   sinkd-ray-worker  GPU nodes: S3 (checkpoints are uploaded by the workers themselves).
#   sinkd-ray-head    the head: what Ray's default head role has (EC2 + S3 full access, the role Ray would
#                     otherwise create as ray-autoscaler-v1), plus iam:PassRole on the worker role (the
#                     autoscaler launches workers with it) and read access to the SSM parameters /sinkd/*
#                     (SINKD_MLFLOW_BACKEND=ssm:/sinkd/...).
#
# Narrower S3 access: replace AmazonS3FullAccess by a policy on your bucket (s3:ListBucket on the bucket,
# s3:GetObject/PutObject/DeleteObject on its objects) for both roles.
set -euo pipefail

account=$(aws sts get-caller-identity --query Account --output text)
trust='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}'

profile() {  # NAME MANAGED_POLICY_ARN...
    local name=$1
    shift
    aws iam get-role --role-name "$name" >/dev/null 2>&1 ||
        aws iam create-role --role-name "$name" --assume-role-policy-document "$trust" >/dev/null
    for arn in "$@"; do
        aws iam attach-role-policy --role-name "$name" --policy-arn "$arn"
    done
    aws iam get-instance-profile --instance-profile-name "$name" >/dev/null 2>&1 ||
        aws iam create-instance-profile --instance-profile-name "$name" >/dev/null
    aws iam get-instance-profile --instance-profile-name "$name" \
        --query 'InstanceProfile.Roles[].RoleName' --output text | grep -qw "$name" ||
        aws iam add-role-to-instance-profile --instance-profile-name "$name" --role-name "$name"
    echo "instance profile $name: ready"
}

profile sinkd-ray-worker arn:aws:iam::aws:policy/AmazonS3FullAccess
profile sinkd-ray-head arn:aws:iam::aws:policy/AmazonEC2FullAccess arn:aws:iam::aws:policy/AmazonS3FullAccess
aws iam put-role-policy --role-name sinkd-ray-head --policy-name sinkd-ray-head-extra --policy-document "{
  \"Version\": \"2012-10-17\",
  \"Statement\": [
    {\"Effect\": \"Allow\", \"Action\": \"iam:PassRole\",
     \"Resource\": \"arn:aws:iam::${account}:role/sinkd-ray-worker\"},
    {\"Effect\": \"Allow\", \"Action\": \"ssm:GetParameter\",
     \"Resource\": \"arn:aws:ssm:*:${account}:parameter/sinkd/*\"}
  ]
}"
echo "sinkd-ray-head may pass sinkd-ray-worker to the GPU nodes and read /sinkd/* parameters"
